"""The TP plan as data, sharded loading and dummy weights, without processes."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from torch.distributed.tensor import Replicate, Shard

from wan_spmd.config import REAL_MODELS
from wan_spmd.loading import expert_on_meta, load_expert_sharded
from wan_spmd.parallel.tp import TP_PLAN, planned_placement


def test_placements_follow_the_plan():
    """Column-parallel weights and biases split rows; row-parallel weights split columns and keep
    their bias whole; everything outside the blocks stays whole."""
    assert planned_placement("blocks.3.attn1.to_q.weight") == Shard(0)
    assert planned_placement("blocks.3.attn2.to_v.bias") == Shard(0)
    assert planned_placement("blocks.0.ffn.net.0.proj.weight") == Shard(0)
    assert planned_placement("blocks.0.ffn.net.2.weight") == Shard(1)
    assert planned_placement("blocks.0.attn1.to_out.0.bias") == Replicate()
    assert planned_placement("blocks.0.attn1.norm_q.weight") is None  # sliced by AcrossHeadsRMSNorm
    assert planned_placement("blocks.0.scale_shift_table") is None
    assert planned_placement("proj_out.weight") is None
    assert {v for v in TP_PLAN.values()} == {"colwise", "rowwise", "rmsnorm_across_heads"}


def test_real_a14b_expert_has_the_real_parameter_count_per_rank():
    """Counted on the meta device (nothing allocated): 14.29 B per expert; at TP=2 each rank holds
    the sharded 14.05 B halved plus the replicated 0.24 B: 7.26 B."""
    model = expert_on_meta(REAL_MODELS["wan2.2-i2v-a14b"].transformer_config)
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    total = sum(p.numel() for p in params.values())
    assert abs(total / 1e9 - 14.29) < 0.01, total
    sharded = sum(p.numel() for n, p in params.items() if isinstance(planned_placement(n), Shard))
    per_rank_tp2 = sharded // 2 + (total - sharded)
    assert sharded / total > 0.98  # attention and FFN are nearly all of it
    assert abs(per_rank_tp2 / 1e9 - 7.26) < 0.01, per_rank_tp2
    t2v = expert_on_meta(REAL_MODELS["wan2.2-t2v-a14b"].transformer_config)
    assert t2v.patch_embedding.weight.shape[1] == 16


def test_sharded_loader_without_mesh_equals_from_pretrained(tiny_i2v):
    """Our slice-reading loader (TP=1) gives exactly diffusers' from_pretrained weights and buffers."""
    ours = load_expert_sharded(tiny_i2v / "transformer", None, torch.device("cpu"), torch.float32)
    ref = WanTransformer3DModel.from_pretrained(tiny_i2v / "transformer", torch_dtype=torch.float32)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    for name, value in ref_sd.items():
        assert torch.equal(ours_sd[name], value), name
    assert torch.equal(ours.rope.freqs_cos, ref.rope.freqs_cos)
