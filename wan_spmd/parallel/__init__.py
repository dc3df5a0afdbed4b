"""Every collective but the control plane's: the device mesh of a `ParallelLayout`, and the step
that turns a single-device expert into its parallel form.

Model code stays single-device (diffusers' `WanTransformer3DModel`); `parallelize` is applied to
each expert after loading, as torchtitan separates model code from its parallelisation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from wan_spmd.launch import ParallelLayout
from wan_spmd.parallel.tp import TP_PLAN, shard_block, shard_expert, tp_mesh

__all__ = ["MESH_AXES", "TP_PLAN", "build_mesh", "parallelize", "shard_block", "shard_expert", "tp_mesh", "tp_submesh"]

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


def parallelize(expert: nn.Module, mesh: DeviceMesh | None, layout: ParallelLayout, sequence_regions: bool = True):
    """Apply the layout to one expert, in place: TP (with its sequence regions) over the tp axis."""
    if mesh is not None and layout.tp > 1:
        shard_expert(expert, mesh["tp"], sequence_regions)
    return expert
