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
  (frames x h/2 x w/2) often does not, so the expert pads its tokens to a multiple of the split
  (`parallel.expert`), self-attention drops the padding (exact), and the block calls the
  gather/scatter points explicitly (`TensorParallel`, called by `parallel.blocks.WanBlock`).
- TI2V's timestep is per token, so each block's modulation (`temb`, (B, S, 6, D)) has a sequence
  dimension: the expert splits it with the tokens once, before the blocks, or the shift/scale/gate
  of other ranks' tokens would be applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
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


@dataclass(frozen=True)
class TensorParallel:
    """The tp axis of one layout, and its sequence regions (made once per mesh, shared by the experts).

    With `regions`, the tokens between the row-parallel outputs and the next column-parallel inputs
    are split over the tp ranks (the expert pads them to a multiple of the split); without, the
    row-parallel outputs are all-reduced by torch's own style and every rank holds every token."""

    group: dist.ProcessGroup
    size: int
    rank: int
    regions: bool = True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S/tp, D) on each rank -> (B, S, D) everywhere (the input of a column-parallel region)."""
        if not self.regions:
            return x
        local = x.transpose(0, 1).contiguous()  # (S/tp, B, D): a free view for B == 1
        return funcol.all_gather_tensor(local, 0, self.group).transpose(0, 1)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Row-parallel partial sums (B, S, D) -> the summed (B, S/tp, D) shard of this rank."""
        if not self.regions:
            return partial  # RowwiseParallel() has all-reduced them already
        full = partial.transpose(0, 1).contiguous()  # (S, B, D)
        return funcol.reduce_scatter_tensor(full, "sum", 0, self.group).transpose(0, 1)


def _style(name: str, regions: bool):
    if name == "colwise":
        return ColwiseParallel()
    # With sequence regions the row-parallel outputs stay partial sums: `TensorParallel.reduce`
    # reduce-scatters them over the tokens.
    return RowwiseParallel(output_layouts=Partial()) if regions else RowwiseParallel()


def shard_block(block: nn.Module, mesh: DeviceMesh, regions: bool = False) -> nn.Module:
    """Apply `TP_PLAN` to one block, in place. With `regions` the row-parallel outputs are left as
    partial sums for the caller to reduce (`TensorParallel.reduce`, in `parallel.blocks.WanBlock`);
    without, the block computes the whole block's result on its own (torch's all-reducing style)."""
    tp_size, tp_rank, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    dense = {k: _style(v, regions) for k, v in TP_PLAN.items() if v in ("colwise", "rowwise")}
    parallelize_module(block, mesh, dense)
    for name in (k for k, v in TP_PLAN.items() if v == "rmsnorm_across_heads"):
        parent_name, child = name.rsplit(".", 1)
        parent = block.get_submodule(parent_name)
        setattr(parent, child, AcrossHeadsRMSNorm(getattr(parent, child), tp_rank, tp_size, group))
    # the attention processors split q/k/v by `attn.heads`: they must see the local head count
    # (cross-attention has no rotary to fail loudly on a wrong count)
    for attn in (block.attn1, block.attn2):
        attn.heads //= tp_size
    return block


def shard_expert(transformer: nn.Module, mesh: DeviceMesh, regions: bool = False) -> nn.Module:
    """Shard every block of one expert, in place (see `shard_block`).

    Weights the plan shards may already be DTensors (sharded loading); otherwise all ranks must
    hold identical full weights, which DTensor distributes from rank 0.
    """
    check_layout(ParallelLayout(tp=mesh.size()), dict(transformer.config))
    for block in transformer.blocks:
        shard_block(block, mesh, regions)
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
