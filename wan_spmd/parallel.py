"""Tensor parallelism for the Wan2.2 experts, written as data.

The model code stays single-device (diffusers' `WanTransformer3DModel`); this module owns every
collective. Each transformer block is sharded by `TP_PLAN` with PyTorch's own DTensor styles:
column-parallel layers shard out_features (attention heads, FFN hidden units), row-parallel layers
shard in_features and all-reduce their output, so each block costs two all-reduces (attention
output, FFN output) per attention layer.

One thing DTensor's styles cannot express is written by hand: Wan normalises q and k with an
RMSNorm over the *whole* inner dimension (all heads together, `rms_norm_across_heads`). With heads
sharded, each rank holds only its heads' slice, so the norm must all-reduce the sums of squares
across ranks; normalising the local slice alone would be silently wrong.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from wan_spmd.config import check_tp

# Module pattern (inside each `blocks.*`) -> style. Left replicated on purpose: the patch and
# condition embeddings, FP32LayerNorms, the modulation tables and proj_out (small, or element-wise
# work on the full hidden state; the sequence-parallel work of a later step shards that).
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
        self.full_dim = full_dim
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.group = group
        weight = norm.weight.detach()[tp_rank * local_dim : (tp_rank + 1) * local_dim].clone()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, S, local_dim); the statistics in fp32, as torch's RMSNorm computes them
        x32 = x.float()
        sum_sq = x32.pow(2).sum(dim=-1, keepdim=True)  # (B, S, 1)
        dist.all_reduce(sum_sq, group=self.group)
        out = x32 * torch.rsqrt(sum_sq / self.full_dim + self.eps)
        return out.to(x.dtype) * self.weight


def tp_mesh(device: torch.device, tp_size: int) -> DeviceMesh:
    """A 1-D mesh over all ranks (tensor parallelism stays inside one host)."""
    return init_device_mesh(device.type, (tp_size,), mesh_dim_names=("tp",))


def _style(name: str):
    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}[name]()


def shard_block(block: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Apply `TP_PLAN` to one `WanTransformerBlock`, in place."""
    tp_size, tp_rank, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    parallelize_module(block, mesh, {k: _style(v) for k, v in TP_PLAN.items() if v in ("colwise", "rowwise")})
    for name in (k for k, v in TP_PLAN.items() if v == "rmsnorm_across_heads"):
        parent_name, child = name.rsplit(".", 1)
        parent = block.get_submodule(parent_name)
        setattr(parent, child, AcrossHeadsRMSNorm(getattr(parent, child), tp_rank, tp_size, group))
    # diffusers' processor splits q/k/v by `attn.heads`: it must see the local head count
    # (cross-attention has no rotary to fail loudly on a wrong count)
    for attn in (block.attn1, block.attn2):
        attn.heads //= tp_size
    return block


def shard_expert(transformer: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard every block of one expert, in place.

    All ranks must hold identical full weights first: DTensor distributes each planned weight from
    rank 0, and the replicated rest is used as each rank has it.
    """
    check_tp(dict(transformer.config), mesh.size())
    for block in transformer.blocks:
        shard_block(block, mesh)
    return transformer


def shard_experts(components, tp_size: int, device: torch.device) -> DeviceMesh:
    """Shard both experts (`transformer`, `transformer_2`) over one TP mesh."""
    mesh = tp_mesh(device, tp_size)
    shard_expert(components.transformer, mesh)
    shard_expert(components.transformer_2, mesh)
    return mesh
