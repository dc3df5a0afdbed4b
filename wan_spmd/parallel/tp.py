"""Tensor parallelism for the Wan2.2 experts, written as data, with its sequence regions.

The model code stays single-device (diffusers' `WanTransformer3DModel`); this module owns every
collective. Each transformer block is sharded by `TP_PLAN` with PyTorch's own DTensor styles:
column-parallel layers shard out_features (attention heads, FFN hidden units), row-parallel layers
shard in_features and leave partial sums.

Written by hand, and why:
- Wan normalises q and k with an RMSNorm over the *whole* inner dimension (all heads together,
  `rms_norm_across_heads`). With heads sharded each rank holds only its heads' slice, so the norm
  all-reduces the sums of squares; normalising the local slice alone would be silently wrong.
- Sequence regions (inside TP; not Ulysses, which splits attention itself). Between the
  row-parallel outputs and the next column-parallel inputs, Wan's block does element-wise work
  on the full hidden state (fp32 norms, modulation, gates, residuals). We reduce-scatter the
  partial sums over the sequence instead of all-reducing them, run that work on each rank's 1/tp
  of the tokens, and all-gather before the next projections (torch's `SequenceParallel` +
  `PrepareModuleInput` idea). Torch's styles assume the sequence splits evenly; Wan's token count
  (frames x h/2 x w/2) often does not, so the gather/scatter points are hooks of ours that fall
  back to a plain all-reduce for an uneven sequence.
- TI2V's timestep is per token, so each block's modulation (`temb`, (B, S, 6, D)) has a sequence
  dimension: inside the regions it is narrowed to the rank's tokens before every block (the model
  hands each block the whole table), or the shift/scale/gate of other ranks' tokens would be applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from wan_spmd.launch import ParallelLayout, check_layout

# Module pattern (inside each `blocks.*`) -> style. Left replicated on purpose: the patch and
# condition embeddings, the modulation tables and proj_out (small, and outside the blocks), and the
# FP32LayerNorms (element-wise: they run on each rank's sequence shard instead).
TP_PLAN: dict[str, str] = {
    # self-attention: heads split across ranks
    "attn1.to_q": "colwise",
    "attn1.to_k": "colwise",
    "attn1.to_v": "colwise",
    "attn1.norm_q": "rmsnorm_across_heads",
    "attn1.norm_k": "rmsnorm_across_heads",
    "attn1.to_out.0": "rowwise",
    # cross-attention to the text embeddings: the same split
    "attn2.to_q": "colwise",
    "attn2.to_k": "colwise",
    "attn2.to_v": "colwise",
    "attn2.norm_q": "rmsnorm_across_heads",
    "attn2.norm_k": "rmsnorm_across_heads",
    "attn2.to_out.0": "rowwise",
    # feed-forward: hidden units split
    "ffn.net.0.proj": "colwise",
    "ffn.net.2": "rowwise",
}
# Sequence-parallel regions: gather the token shards before these modules' inputs ...
SP_GATHER = ("attn1", "attn2", "ffn")
# ... and reduce-scatter the row-parallel partial sums after these outputs.
SP_SCATTER = ("attn1.to_out.0", "attn2.to_out.0", "ffn.net.2")


class AcrossHeadsRMSNorm(nn.Module):
    """RMSNorm over the full inner dimension when each rank holds only `1/tp` of it.

    The sum of squares of the local slice is all-reduced over the TP group, so the result equals
    the unsharded norm's slice; the weight is this rank's slice of the full weight.
    """

    def __init__(self, norm: nn.RMSNorm, tp_rank: int, tp_size: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        (full_dim,) = norm.normalized_shape
        local_dim = full_dim // tp_size
        self.inv_dim = 1.0 / full_dim
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.group = group
        weight = norm.weight.detach()[tp_rank * local_dim : (tp_rank + 1) * local_dim].clone()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, S, local_dim); statistics in fp32, as torch's RMSNorm computes them. Functional
        # collectives, so a compiled block traces through them (fused into its neighbours)
        sum_sq = x.float().pow(2).sum(dim=-1, keepdim=True)  # (B, S, 1)
        sum_sq = funcol.all_reduce(sum_sq, "sum", self.group)
        return (x.float() * torch.rsqrt(sum_sq * self.inv_dim + self.eps)).to(x.dtype) * self.weight


@dataclass
class SequenceRegions:
    """Per-expert state of the sequence-parallel regions: on for the current forward only when the
    token count splits evenly over the ranks."""

    group: dist.ProcessGroup
    tp_size: int
    tp_rank: int
    enabled: bool = False

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> this rank's (B, S/tp, D)."""
        return x.chunk(self.tp_size, dim=1)[self.tp_rank].contiguous()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S/tp, D) on each rank -> (B, S, D) everywhere."""
        local = x.transpose(0, 1).contiguous()  # (S/tp, B, D): a free view for B == 1
        return funcol.all_gather_tensor(local, 0, self.group).transpose(0, 1)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Partial sums (B, S, D) -> summed (B, S/tp, D) shard, or all of it when SP is off."""
        if not self.enabled:
            return funcol.all_reduce(partial, "sum", self.group)
        full = partial.transpose(0, 1).contiguous()  # (S, B, D)
        return funcol.reduce_scatter_tensor(full, "sum", 0, self.group).transpose(0, 1)


def _enter_blocks(shards: SequenceRegions, module, args, kwargs):
    hidden = args[0]  # (B, S, D), the patch-embedded tokens, replicated
    shards.enabled = hidden.shape[1] % shards.tp_size == 0
    return ((shards.split(hidden) if shards.enabled else hidden), *args[1:]), kwargs


def _leave_blocks(shards: SequenceRegions, module, args, output):
    return shards.gather(output) if shards.enabled else output


def _split_modulation(shards: SequenceRegions, module, args, kwargs):
    """A per-token modulation (B, S, 6, D) follows the tokens into this rank's (B, S/tp, 6, D) view;
    a per-video one (B, 6, D) applies to every token as it is."""
    temb = args[2] if len(args) > 2 else kwargs.get("temb")
    if not shards.enabled or temb is None or temb.ndim != 4:
        return None
    local = temb.shape[1] // shards.tp_size
    temb = temb.narrow(1, shards.tp_rank * local, local)  # a view: no copy of the (large) table
    if len(args) > 2:
        return (*args[:2], temb, *args[3:]), kwargs
    return args, {**kwargs, "temb": temb}


def _gather_input(shards: SequenceRegions, module, args, kwargs):
    if not shards.enabled:
        return None
    return (shards.gather(args[0]), *args[1:]), kwargs


def _reduce_output(shards: SequenceRegions, module, args, output):
    return shards.reduce(output)


def tp_mesh(device: torch.device, tp_size: int) -> DeviceMesh:
    """A 1-D mesh over all ranks, for tests of the TP plan alone; the engine takes the tp sub-mesh
    of `parallel.build_mesh`."""
    return init_device_mesh(device.type, (tp_size,), mesh_dim_names=("tp",))


def _style(name: str, sequence_regions: bool):
    if name == "colwise":
        return ColwiseParallel()
    # Row-parallel outputs stay partial sums; `SequenceRegions.reduce` sums them (scatter or all-reduce).
    return RowwiseParallel(output_layouts=Partial()) if sequence_regions else RowwiseParallel()


def shard_block(block: nn.Module, mesh: DeviceMesh, shards: SequenceRegions | None = None) -> nn.Module:
    """Apply `TP_PLAN` (and, with `shards`, the sequence-parallel regions) to one block, in place."""
    tp_size, tp_rank, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    dense = {k: _style(v, shards is not None) for k, v in TP_PLAN.items() if v in ("colwise", "rowwise")}
    parallelize_module(block, mesh, dense)
    for name in (k for k, v in TP_PLAN.items() if v == "rmsnorm_across_heads"):
        parent_name, child = name.rsplit(".", 1)
        parent = block.get_submodule(parent_name)
        setattr(parent, child, AcrossHeadsRMSNorm(getattr(parent, child), tp_rank, tp_size, group))
    # diffusers' processor splits q/k/v by `attn.heads`: it must see the local head count
    # (cross-attention has no rotary to fail loudly on a wrong count)
    for attn in (block.attn1, block.attn2):
        attn.heads //= tp_size
    if shards is not None:
        # after `_enter_blocks` on the first block, which decides whether the regions are on
        block.register_forward_pre_hook(lambda m, a, k: _split_modulation(shards, m, a, k), with_kwargs=True)
        for name in SP_GATHER:
            block.get_submodule(name).register_forward_pre_hook(
                lambda m, a, k: _gather_input(shards, m, a, k), with_kwargs=True
            )
        for name in SP_SCATTER:
            block.get_submodule(name).register_forward_hook(lambda m, a, o: _reduce_output(shards, m, a, o))
    return block


def shard_expert(transformer: nn.Module, mesh: DeviceMesh, sequence_regions: bool = True) -> nn.Module:
    """Shard every block of one expert, in place.

    Weights the plan shards may already be DTensors (sharded loading); otherwise all ranks must
    hold identical full weights, which DTensor distributes from rank 0.
    """
    check_layout(ParallelLayout(tp=mesh.size()), dict(transformer.config))
    shards = None
    if sequence_regions:
        shards = SequenceRegions(mesh.get_group(), mesh.size(), mesh.get_local_rank())
        blocks = transformer.blocks
        blocks[0].register_forward_pre_hook(lambda m, a, k: _enter_blocks(shards, m, a, k), with_kwargs=True)
        blocks[-1].register_forward_hook(lambda m, a, o: _leave_blocks(shards, m, a, o))
    for block in transformer.blocks:
        shard_block(block, mesh, shards)
    return transformer


# ---------------------------------------------------------------------------------------------
# Where each weight lives: the loader reads exactly this rank's slice


def planned_placement(param_name: str):
    """How a weight of the expert is laid out over the TP mesh: Shard(0) for column-parallel weights
    and biases, Shard(1) for row-parallel weights, None (whole on every rank) for the rest."""
    if not param_name.startswith("blocks."):
        return None
    _, _, rest = param_name.split(".", 2)  # blocks.<i>.<module>.<weight|bias>
    module, _, kind = rest.rpartition(".")  # blocks.<i>.scale_shift_table has no module part
    style = TP_PLAN.get(module)
    if style == "colwise":
        return Shard(0)
    if style == "rowwise":
        return Shard(1) if kind == "weight" else Replicate()
    return None


def local_slice(shape: torch.Size, placement, tp_rank: int, tp_size: int) -> tuple[slice, ...]:
    index = [slice(None)] * len(shape)
    if isinstance(placement, Shard):
        size = shape[placement.dim] // tp_size
        index[placement.dim] = slice(tp_rank * size, (tp_rank + 1) * size)
    return tuple(index)


def attach_param(model: nn.Module, name: str, local: torch.Tensor, placement, mesh: DeviceMesh | None) -> None:
    value = (
        local if placement is None or mesh is None else DTensor.from_local(local, mesh, [placement], run_check=False)
    )
    owner_name, _, attr = name.rpartition(".")  # "" is the model itself (scale_shift_table)
    setattr(model.get_submodule(owner_name), attr, nn.Parameter(value, requires_grad=False))
