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
(`ParallelExpert(..., wide=True)`); (3) the split must come *before* tensor parallelism's own
sequence regions at the first block and the gather *after* them at the last, which the expert's
forward (`parallel.expert`) orders explicitly. The collectives are functional, so compiled blocks
trace through them.

Rotary: the self-attention processor (`parallel.blocks.SelfAttention`) takes the rows of the rope
table (cos, sin per token) of exactly its tokens, so each rank rotates its queries and keys by their
true positions before the all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceGroup:
    """Ranks that split one forward's tokens among them; `rank` is this rank's index in it."""

    group: dist.ProcessGroup
    size: int
    rank: int


def pad_split(x: torch.Tensor, parts: int, index: int, dim: int = 1) -> torch.Tensor:
    """(.., S, ..) -> part `index` of `parts`: (.., ceil(S/parts), ..), zero rows padding the last parts."""
    shard = -(-x.shape[dim] // parts)
    pad = shard * parts - x.shape[dim]
    widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]  # F.pad counts dims from the last
    return F.pad(x, widths).narrow(dim, index * shard, shard).contiguous()


def gather_tokens(x: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
    """(B, S/n, D) on each rank -> (B, S_pad, D) everywhere, in the group's rank order."""
    local = x.transpose(0, 1).contiguous()  # (S/n, B, D)
    return funcol.all_gather_tensor(local, 0, group.group).transpose(0, 1)


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
