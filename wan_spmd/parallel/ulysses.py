"""Ulysses sequence parallelism for the Wan2.2 experts, composable with tensor parallelism.

The tokens (frames x h/2 x w/2 after patch embedding) are split over the ranks of a sequence
group at the first block and gathered after the last; everything between is token-local except
self-attention. Around self-attention, one all-to-all turns (this rank's tokens, all its heads)
into (all tokens, 1/n of its heads), attention runs on whole sequences, and a second all-to-all
turns it back. Cross-attention needs nothing: its keys and values (the 512 text tokens) are whole
on every rank, so each rank's queries attend locally.

Written here rather than with diffusers' `_cp_plan`/`ContextParallelConfig`, because we need
three things its hooks do not give us together: (1) a token count that does not split evenly is
padded (and the padding dropped before attention, so the result is exact); (2) the group can change
per forward: under CFG-parallel a request with guidance off splits its tokens over both cfg groups
(`sequence_group(model, wide=True)`); (3) the split must come *before* tensor parallelism's own
sequence regions at the first block and the gather *after* them at the last, which our hooks order
explicitly. The collectives are functional, so compiled blocks trace through them.

Rotary: the rope module's output (cos, sin per token) is split exactly as the tokens are, so each
rank rotates its queries and keys by their true positions before the all-to-all.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn


@dataclass(frozen=True)
class SequenceGroup:
    """Ranks that split one forward's tokens among them; `rank` is this rank's index in it."""

    group: dist.ProcessGroup
    size: int
    rank: int


class SequenceShards:
    """Per-expert state: the group that splits the current forward's tokens (None: not split), and
    the true token count of that forward, so padding can be dropped."""

    def __init__(self, narrow: SequenceGroup | None, wide: SequenceGroup | None) -> None:
        self.narrow = narrow
        """The ulysses axis: used by every forward unless `wide` is selected."""
        self.wide = wide
        """The (cfg, ulysses) axes flattened: for a request with guidance off under CFG-parallel;
        None where the heads do not split over it."""
        self.active = narrow
        self.seq_len = 0

    def pad_split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """(.., S, ..) -> this rank's (.., ceil(S/n), ..): zero rows pad the last shards."""
        group = self.active
        shard = -(-x.shape[dim] // group.size)
        pad = shard * group.size - x.shape[dim]
        if pad:
            widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]  # F.pad counts dims from the last
            x = F.pad(x, widths)
        return x.narrow(dim, group.rank * shard, shard).contiguous()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S/n, D) on each rank -> (B, S, D) everywhere, padding dropped."""
        local = x.transpose(0, 1).contiguous()  # (S/n, B, D)
        whole = funcol.all_gather_tensor(local, 0, self.active.group).transpose(0, 1)
        return whole[:, : self.seq_len]


def seq_to_heads(x: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
    """(B, S/n, h, d) token shard with all local heads -> (B, S, h/n, d): all tokens, 1/n of the heads."""
    b, s_local, h, d = x.shape
    n = group.size
    x = x.reshape(b, s_local, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()  # (n, B, S/n, h/n, d): by head group
    x = funcol.all_to_all_single(x, None, None, group.group)  # (n, B, S/n, h/n, d): by token shard
    return x.permute(1, 0, 2, 3, 4).reshape(b, n * s_local, h // n, d)


def heads_to_seq(x: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
    """The inverse of `seq_to_heads`: (B, S, h/n, d) -> (B, S/n, h, d)."""
    b, s, h_part, d = x.shape
    n = group.size
    x = x.reshape(b, n, s // n, h_part, d).permute(1, 0, 2, 3, 4).contiguous()  # (n, B, S/n, h/n, d): by token shard
    x = funcol.all_to_all_single(x, None, None, group.group)  # (n, B, S/n, h/n, d): by head group
    return x.permute(1, 2, 0, 3, 4).reshape(b, s // n, n * h_part, d)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs (x0, x1): (x0 cos - x1 sin, x0 sin + x1 cos)."""
    pairs = x.unflatten(-1, (-1, 2))  # (B, S, h, d/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[..., 0::2], sin[..., 1::2]  # the tables repeat each frequency twice
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class UlyssesSelfAttention:
    """Self-attention processor for `attn1` (diffusers' processor interface): token-local
    projections, q/k norms and rotary, then all-to-all to head shards around the attention core."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, shards: SequenceShards) -> None:
        self.shards = shards

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        group = self.shards.active
        query = attn.norm_q(attn.to_q(hidden_states))  # (B, S/n, h*d): this rank's tokens, its heads
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        qkv = torch.stack([t.unflatten(2, (attn.heads, -1)) for t in (query, key, value)])  # (3, B, S/n, h, d)
        if rotary_emb is not None:
            qkv[:2] = rotate(qkv[:2], *rotary_emb)
        if group is not None:
            # one all-to-all for q, k and v together, each head carrying its three: (B, S/n, h, 3*d)
            _, b, s_local, h, d = qkv.shape
            qkv = seq_to_heads(qkv.permute(1, 2, 3, 0, 4).reshape(b, s_local, h, 3 * d), group)
            qkv = qkv.unflatten(3, (3, d)).permute(3, 0, 1, 2, 4)  # (3, B, S_pad, h/n, d)
            qkv = qkv[:, :, : self.shards.seq_len]  # padding tokens must not be attended to
        query, key, value = qkv.unbind(0)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=None
        )  # (B, S, h/n, d)
        if group is not None:
            s_pad = s_local * group.size
            out = F.pad(out, (0, 0, 0, 0, 0, s_pad - out.shape[1]))
            out = heads_to_seq(out, group)  # (B, S/n, h, d)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


_SHARDS: weakref.WeakKeyDictionary[nn.Module, SequenceShards] = weakref.WeakKeyDictionary()


def _split_rope(shards: SequenceShards, module, args, output):
    if shards.active is None:
        return output
    return tuple(shards.pad_split(t, dim=1) for t in output)  # (1, S, 1, d) -> (1, S/n, 1, d)


def _enter_blocks(shards: SequenceShards, module, args, kwargs):
    hidden = args[0]  # (B, S, D), the patch-embedded tokens, whole on every rank
    shards.seq_len = hidden.shape[1]
    if shards.active is None:
        return None
    return (shards.pad_split(hidden), *args[1:]), kwargs


def _leave_blocks(shards: SequenceShards, module, args, output):
    return output if shards.active is None else shards.gather(output)


def shard_sequence(transformer: nn.Module, narrow: SequenceGroup | None, wide: SequenceGroup | None) -> SequenceShards:
    """Install the sequence split on one expert, in place. Call after tensor parallelism's
    `shard_expert`: the split hook is prepended (it runs before TP's sequence regions split
    further) and the gather hook appended (it runs after TP's regions have gathered)."""
    shards = SequenceShards(narrow, wide)
    transformer.rope.register_forward_hook(lambda m, a, o: _split_rope(shards, m, a, o))
    blocks = transformer.blocks
    blocks[0].register_forward_pre_hook(lambda m, a, k: _enter_blocks(shards, m, a, k), with_kwargs=True, prepend=True)
    blocks[-1].register_forward_hook(lambda m, a, o: _leave_blocks(shards, m, a, o))
    for block in blocks:
        block.attn1.set_processor(UlyssesSelfAttention(shards))
    _SHARDS[transformer] = shards
    return shards


def can_widen(model: nn.Module) -> bool:
    """Whether this expert can split a request's tokens over the (cfg, ulysses) ranks together."""
    shards = _SHARDS.get(model)
    return shards is not None and shards.wide is not None


@contextmanager
def sequence_group(model: nn.Module, wide: bool) -> Iterator[None]:
    """The forwards inside split their tokens over the wide group (cfg x ulysses) when `wide`."""
    shards = _SHARDS.get(model)
    if shards is None or not wide:
        yield
        return
    shards.active = shards.wide
    try:
        yield
    finally:
        shards.active = shards.narrow
