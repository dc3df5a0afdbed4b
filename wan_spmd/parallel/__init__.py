"""Every collective but the control plane's: the device mesh of a `ParallelLayout`, and the step
that turns a single-device expert into its parallel form.

Model code stays single-device (diffusers' `WanTransformer3DModel`); `parallelize` is applied to
each expert after loading, as torchtitan separates model code from its parallelisation.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from wan_spmd.launch import ParallelLayout
from wan_spmd.parallel.cfg import CfgParallel, cfg_branch
from wan_spmd.parallel.tp import TP_PLAN, shard_block, shard_expert, tp_mesh
from wan_spmd.parallel.ulysses import SequenceGroup, shard_sequence

__all__ = [
    "MESH_AXES",
    "TP_PLAN",
    "build_mesh",
    "cfg_branch",
    "CfgParallel",
    "parallelize",
    "shard_block",
    "shard_expert",
    "tp_mesh",
    "tp_submesh",
]

log = logging.getLogger("wan_spmd")

MESH_AXES = ("cfg", "ulysses", "tp")
"""Outermost first: tp innermost keeps a tensor-parallel group on neighbouring ranks (one host)."""


def build_mesh(layout: ParallelLayout, device: torch.device) -> DeviceMesh | None:
    """The (cfg, ulysses, tp) mesh over the world; None for one rank."""
    if layout.is_single:
        return None
    return init_device_mesh(device.type, layout.mesh_shape, mesh_dim_names=MESH_AXES)


def tp_submesh(mesh: DeviceMesh | None, layout: ParallelLayout) -> DeviceMesh | None:
    """The tensor-parallel sub-mesh the loaders slice weights over (None without TP)."""
    if mesh is None or layout.tp == 1:
        return None
    return mesh["tp"]


_SEQUENCE_GROUPS: dict[DeviceMesh, tuple[SequenceGroup | None, SequenceGroup | None]] = {}


def sequence_groups(mesh: DeviceMesh, layout: ParallelLayout) -> tuple[SequenceGroup | None, SequenceGroup | None]:
    """(ulysses axis, cfg x ulysses axes flattened), made once per mesh (every rank, same order)."""
    if mesh not in _SEQUENCE_GROUPS:
        narrow = wide = None
        if layout.ulysses > 1:
            axis = mesh["ulysses"]
            narrow = SequenceGroup(axis.get_group(), axis.size(), axis.get_local_rank())
        if layout.cfg > 1:
            # ranks that share a tp index: cfg-major, so the token shards are in (cfg, ulysses) order
            axis = mesh["cfg", "ulysses"]._flatten()
            wide = SequenceGroup(axis.get_group(), axis.size(), axis.get_local_rank())
        _SEQUENCE_GROUPS[mesh] = (narrow, wide)
    return _SEQUENCE_GROUPS[mesh]


def parallelize(
    expert: nn.Module,
    mesh: DeviceMesh | None,
    layout: ParallelLayout,
    sequence_regions: bool = True,
    per_token_timesteps: bool = False,
):
    """Apply the layout to one expert, in place: TP (with its sequence regions) over the tp axis,
    then the Ulysses sequence split over the ulysses axis (and, for requests with guidance off
    under CFG-parallel, over the cfg and ulysses axes together). With `per_token_timesteps`
    (TI2V) the Ulysses split does not yet cut the per-token modulation, so guidance-off requests
    keep the plain CFG-parallel path (launch refuses --ulysses for such a model)."""
    if mesh is not None and layout.tp > 1:
        shard_expert(expert, mesh["tp"], sequence_regions)
    if mesh is not None and (layout.ulysses > 1 or layout.cfg > 1):
        narrow, wide = sequence_groups(mesh, layout)
        local_heads = int(expert.config.num_attention_heads) // layout.tp
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
        if narrow is not None or wide is not None:
            shard_sequence(expert, narrow, wide)
    return expert
