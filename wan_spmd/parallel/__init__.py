"""Every collective but the control plane's: the groups of a `ParallelLayout` (`ParallelMesh`), and
the step that turns a single-device expert into its parallel form (`parallelize`, which returns the
`ParallelExpert` the pipeline calls).

Model code stays single-device (diffusers' `WanTransformer3DModel`); `parallelize` is applied to
each expert after loading, as torchtitan separates model code from its parallelisation. Nothing
here keeps module-level state: the mesh's groups live in the `ParallelMesh` the engine builds once,
and each expert's layout in its `ParallelExpert`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from wan_spmd.attention import AttentionFn, sdpa
from wan_spmd.launch import ParallelLayout
from wan_spmd.parallel.blocks import CrossAttention, SelfAttention, WanBlock
from wan_spmd.parallel.cfg import BRANCHES, CfgParallel
from wan_spmd.parallel.expert import ParallelExpert
from wan_spmd.parallel.tp import TP_PLAN, TensorParallel, shard_block, shard_expert
from wan_spmd.parallel.ulysses import SequenceGroup

__all__ = [
    "MESH_AXES",
    "TP_PLAN",
    "CfgParallel",
    "ParallelExpert",
    "ParallelMesh",
    "build_mesh",
    "parallelize",
    "shard_block",
    "shard_expert",
]

log = logging.getLogger("wan_spmd")

MESH_AXES = ("cfg", "ulysses", "tp")
"""Outermost first: tp innermost keeps a tensor-parallel group on neighbouring ranks (one host)."""


@dataclass(frozen=True)
class ParallelMesh:
    """The groups of one layout on this rank, made once (every rank, same order) and shared by the
    experts; for one rank, every group is None."""

    layout: ParallelLayout
    mesh: DeviceMesh | None = None
    tp: TensorParallel | None = None
    """The tp axis (with sequence regions on)."""
    narrow: SequenceGroup | None = None
    """The ulysses axis."""
    wide: SequenceGroup | None = None
    """The cfg and ulysses axes as one group (ranks sharing a tp index, cfg-major)."""

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        """The tensor-parallel sub-mesh the loaders slice weights over (None without TP)."""
        return None if self.tp is None else self.mesh["tp"]

    @property
    def cfg_branch(self) -> str | None:
        """The guidance branch this rank's group runs, or None when every rank runs both."""
        return None if self.layout.cfg == 1 else BRANCHES[self.mesh["cfg"].get_local_rank()]


def _group(mesh: DeviceMesh, axis: str) -> SequenceGroup:
    sub = mesh[axis]
    return SequenceGroup(sub.get_group(), sub.size(), sub.get_local_rank())


def _wide_group(mesh: DeviceMesh) -> SequenceGroup:
    """One group per tp index over the (cfg, ulysses) ranks, from public calls: every rank creates
    every group (new_group's rule), and keeps its own. Ranks are numbered cfg-major in the mesh, so
    the group's rank order (sorted global ranks) is the (cfg, ulysses) order the token shards use."""
    ranks = mesh.mesh  # (cfg, ulysses, tp) global ranks
    per_tp = [ranks[:, :, j].flatten().tolist() for j in range(ranks.shape[2])]
    group, _ = dist.new_subgroups_by_enumeration(per_tp)
    return SequenceGroup(group, dist.get_world_size(group), dist.get_rank(group))


def build_mesh(layout: ParallelLayout, device: torch.device) -> ParallelMesh:
    """The (cfg, ulysses, tp) mesh over the world and its groups; no groups for one rank."""
    if layout.is_single:
        return ParallelMesh(layout)
    mesh = init_device_mesh(device.type, layout.mesh_shape, mesh_dim_names=MESH_AXES)
    tp = None
    if layout.tp > 1:
        axis = mesh["tp"]
        tp = TensorParallel(axis.get_group(), axis.size(), axis.get_local_rank())
    narrow = _group(mesh, "ulysses") if layout.ulysses > 1 else None
    wide = _wide_group(mesh) if layout.cfg > 1 else None
    return ParallelMesh(layout, mesh, tp, narrow, wide)


def parallelize(
    expert: nn.Module,
    mesh: ParallelMesh,
    attend: AttentionFn = sdpa,
    sequence_regions: bool = True,
    per_token_timesteps: bool = False,
) -> ParallelExpert:
    """This expert in the layout: TP (with its sequence regions) over the tp axis, in place, then the
    Ulysses token split over the ulysses axis (and, for requests with guidance off under
    CFG-parallel, over the cfg and ulysses axes together); every attention through `attend`. With
    `per_token_timesteps` (TI2V) guidance-off requests keep the plain CFG-parallel path (launch
    refuses --ulysses for such a model)."""
    tp = mesh.tp
    if tp is not None:
        if not sequence_regions:  # benchmarks: plain TP, every rank holding every token
            tp = dataclasses.replace(tp, regions=False)
        shard_expert(expert, mesh.tp_mesh, regions=sequence_regions)
    wide = mesh.wide
    local_heads = int(expert.config.num_attention_heads) // mesh.layout.tp
    if wide is not None and per_token_timesteps:
        log.warning("guidance-off requests run the same forward on both cfg groups (per-token timesteps)")
        wide = None
    if wide is not None and local_heads % wide.size:
        log.warning(
            "guidance-off requests run the same forward on both cfg groups: %d heads per tp rank do not "
            "split over cfg x ulysses = %d",
            local_heads,
            wide.size,
        )
        wide = None
    self_attention, cross_attention = SelfAttention(attend), CrossAttention(attend)
    blocks = [WanBlock(block, self_attention, cross_attention, tp) for block in expert.blocks]
    return ParallelExpert(expert, blocks, tp, mesh.narrow, wide)
