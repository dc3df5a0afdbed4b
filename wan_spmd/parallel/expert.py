"""One expert in its layout: the object `parallelize` returns and the pipeline calls.

`ParallelExpert.__call__` is diffusers' `WanTransformer3DModel.forward`, step for step, with the
points where the layout acts written out: the patch-embedded tokens (and TI2V's per-token
modulation) are split over this rank's token group and its tp ranks once, before the blocks; the
blocks (`parallel.blocks.WanBlock`, which compiling compiles one by one) run on the shard; the
shards are gathered after the last block. Which token group splits a forward is the caller's
explicit choice (`wide=True`: CFG-parallel's cfg x ulysses ranks for a guidance-off request).
"""

from __future__ import annotations

import torch
from torch import nn

from wan_spmd.parallel.blocks import WanBlock
from wan_spmd.parallel.tp import TensorParallel
from wan_spmd.parallel.ulysses import SequenceGroup, gather_tokens, pad_split


class ParallelExpert:
    """One expert (diffusers' module, holding this rank's weights) and how this layout runs it."""

    def __init__(
        self,
        model: nn.Module,
        blocks: list[WanBlock],
        tp: TensorParallel | None,
        narrow: SequenceGroup | None,
        wide: SequenceGroup | None,
    ) -> None:
        self.model = model
        self.blocks = blocks
        """The blocks' forwards in this layout, in order (what regional compilation compiles)."""
        self.tp = tp if tp is not None and tp.regions else None
        """The tp ranks that split the tokens between projections (None: no sequence regions)."""
        self.narrow = narrow
        """The ulysses axis: splits every forward's tokens unless `wide` is asked for (None: not split)."""
        self.wide = wide
        """The (cfg, ulysses) axes as one group, for guidance-off requests under CFG-parallel; None
        where this expert cannot use it."""

    @property
    def can_widen(self) -> bool:
        return self.wide is not None

    def _split(self, x: torch.Tensor, group: SequenceGroup | None) -> torch.Tensor:
        """(B, S, ...) -> this rank's (B, S_pad / (n x tp), ...): part (group rank, tp rank)."""
        n, rank = (1, 0) if group is None else (group.size, group.rank)
        tp_size, tp_rank = (1, 0) if self.tp is None else (self.tp.size, self.tp.rank)
        if n * tp_size == 1:
            return x
        return pad_split(x, n * tp_size, rank * tp_size + tp_rank)

    def _gather(self, x: torch.Tensor, group: SequenceGroup | None, seq_len: int) -> torch.Tensor:
        """The inverse of `_split`: every rank gets all S tokens."""
        if self.tp is not None:
            x = self.tp.gather(x)  # (B, S_pad / n, D): this group rank's shard
        if group is not None:
            x = gather_tokens(x, group)  # (B, S_pad, D)
        return x[:, :seq_len]

    @torch.inference_mode()
    def __call__(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        wide: bool = False,
    ) -> torch.Tensor:
        """(B, C, F, H, W) latents -> (B, C_out, F, H, W) prediction, whole on every rank. `wide`
        splits the tokens over the wide group (it must exist: `can_widen`)."""
        if wide and self.wide is None:
            raise ValueError("this expert has no wide token group")
        group = self.wide if wide else self.narrow
        model = self.model
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = model.config.patch_size
        post_patch_num_frames, post_patch_height, post_patch_width = num_frames // p_t, height // p_h, width // p_w

        # 1. Rotary tables, patch embedding, text and time conditions (as diffusers)
        rotary_emb = model.rope(hidden_states)  # (1, S, 1, d) each: whole, the blocks take their rows
        hidden_states = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, S, D)
        seq_len = hidden_states.shape[1]
        ts_seq_len = None
        if timestep.ndim == 2:  # TI2V: (B, S) per token
            ts_seq_len = timestep.shape[1]
            timestep = timestep.flatten()
        temb, timestep_proj, encoder_hidden_states, _ = model.condition_embedder(
            timestep, encoder_hidden_states, None, timestep_seq_len=ts_seq_len
        )
        if ts_seq_len is not None:
            timestep_proj = timestep_proj.unflatten(2, (6, -1))  # (B, S, 6, D)
            timestep_proj = self._split(timestep_proj, group)  # the modulation follows its tokens
        else:
            timestep_proj = timestep_proj.unflatten(1, (6, -1))  # (B, 6, D)

        # 2. The blocks, on this rank's tokens
        hidden_states = self._split(hidden_states, group)
        for block in self.blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, group)
        hidden_states = self._gather(hidden_states, group, seq_len)  # (B, S, D)

        # 3. Output norm, projection and unpatchify (as diffusers)
        if temb.ndim == 3:  # TI2V: (B, S, D)
            shift, scale = (model.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (model.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = model.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(
            batch_size, post_patch_num_frames, post_patch_height, post_patch_width, p_t, p_h, p_w, -1
        )
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F', p_t, H', p_h, W', p_w)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
