"""One Wan2.2 transformer block as this layout runs it: diffusers' block arithmetic, step for step,
with the tensor-parallel sequence regions and Ulysses' all-to-alls as explicit calls, and every
attention through the `AttentionFn` handed in (`wan_spmd.attention`).

diffusers' `WanTransformerBlock` holds the weights (already sharded by `tp.shard_block`); `WanBlock`
owns the forward, so nothing is patched into diffusers' modules and no hook decides anything per
forward: the token group (Ulysses' narrow one or CFG-parallel's wide one) is an argument. The block
sees its tokens already split by the expert (`parallel.expert`) and padded to a multiple of the
split; only self-attention looks across tokens, and it drops the padding (the rope table passed in
is for the true S tokens, so S is a shape, which compiled blocks keep symbolic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wan_spmd.attention import AttentionFn
from wan_spmd.parallel.tp import TensorParallel
from wan_spmd.parallel.ulysses import SequenceGroup, heads_to_seq, rotate, seq_to_heads


def rope_rows(table: torch.Tensor, tokens: int, index: int, parts: int) -> torch.Tensor:
    """Rows [index * tokens, (index + 1) * tokens) of a (1, S, 1, d) rope table padded with zeros to
    `parts * tokens` rows: the positions of this rank's (padded) token shard."""
    padded = F.pad(table, (0, 0, 0, 0, 0, parts * tokens - table.shape[1]))
    return padded.narrow(1, index * tokens, tokens)


class SelfAttention:
    """`attn1` on this rank's tokens: projections, q/k norms and rotary on its tokens, then (with a
    token group) all-to-all to whole sequences on a share of the heads around `attend`."""

    def __init__(self, attend: AttentionFn) -> None:
        self.attend = attend

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        group: SequenceGroup | None,
    ) -> torch.Tensor:
        seq_len = rotary_emb[0].shape[1]  # the true token count S
        tokens = hidden_states.shape[1]  # this rank's (padded) shard: S_pad / n
        parts, index = (1, 0) if group is None else (group.size, group.rank)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, S/n, h, d)
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        cos, sin = (rope_rows(t, tokens, index, parts) for t in rotary_emb)  # (1, S/n, 1, d)
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        if group is not None:
            # one all-to-all for q, k and v together, each head carrying its three: (B, S/n, h, 3d)
            qkv = seq_to_heads(torch.cat([query, key, value], dim=-1), group)  # (B, S_pad, h/n, 3d)
            query, key, value = qkv.chunk(3, dim=-1)
        # padding tokens must not be attended to
        query, key, value = (t.narrow(1, 0, seq_len) for t in (query, key, value))  # (B, S, h/n, d)
        out = self.attend(query, key, value)
        out = F.pad(out, (0, 0, 0, 0, 0, parts * tokens - seq_len))  # (B, S_pad, h/n, d)
        if group is not None:
            out = heads_to_seq(out, group)  # (B, S/n, h, d)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class CrossAttention:
    """`attn2`: this rank's tokens attend to the whole text (512 tokens on every rank)."""

    def __init__(self, attend: AttentionFn) -> None:
        self.attend = attend

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, S/n, h, d)
        key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))  # (B, 512, h, d)
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))
        out = self.attend(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanBlock(nn.Module):
    """diffusers' `WanTransformerBlock.forward`, term for term, on this rank's tokens; with `tp`'s
    regions the attention and FFN inputs are gathered over the tp ranks and their row-parallel
    partial sums reduce-scattered back."""

    def __init__(
        self,
        block: nn.Module,
        self_attention: SelfAttention,
        cross_attention: CrossAttention,
        tp: TensorParallel | None,
    ) -> None:
        super().__init__()
        if block.attn1.add_k_proj is not None or block.attn1.fused_projections:
            raise ValueError("Wan2.1's image branch and fused projections are not supported")
        self.block = block
        self.self_attention = self_attention
        self.cross_attention = cross_attention
        self.tp = tp

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tp is None else self.tp.gather(x)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.tp is None else self.tp.reduce(x)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        group: SequenceGroup | None,
    ) -> torch.Tensor:
        block = self.block
        if temb.ndim == 4:  # TI2V: (B, S, 6, D) per token, already this rank's tokens
            modulation = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
            shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (m.squeeze(2) for m in modulation)
        else:  # A14B: (B, 6, D), one per video
            shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
                block.scale_shift_table + temb.float()
            ).chunk(6, dim=1)

        # 1. Self-attention
        norm_hidden_states = (block.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output = self.self_attention(block.attn1, self._gather(norm_hidden_states), rotary_emb, group)
        attn_output = self._reduce(attn_output)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        # 2. Cross-attention
        norm_hidden_states = block.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.cross_attention(block.attn2, self._gather(norm_hidden_states), encoder_hidden_states)
        hidden_states = hidden_states + self._reduce(attn_output)

        # 3. Feed-forward
        norm_hidden_states = (block.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
            hidden_states
        )
        ff_output = self._reduce(block.ffn(self._gather(norm_hidden_states)))
        return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)
