"""The TP plan as data, sharded loading, and the objects `parallelize` returns, without processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch.distributed.tensor import Replicate, Shard

from wan_spmd.attention import sdpa
from wan_spmd.config import REAL_MODELS
from wan_spmd.launch import ParallelLayout
from wan_spmd.loading import expert_on_meta, load_expert_sharded
from wan_spmd.parallel import build_mesh, parallelize
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


def _expert_inputs(model, timestep_per_token: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, model.config.in_channels, 3, 8, 12, generator=gen)  # 3 x 4 x 6 = 72 tokens
    context = torch.randn(1, 512, model.config.text_dim, generator=gen)
    t = torch.full((1, 72), 900.0) if timestep_per_token else torch.tensor([900.0])
    return x, t, context


@pytest.mark.parametrize("variant", ["i2v", "ti2v"])
def test_one_rank_parallel_expert_is_diffusers_forward_bit_for_bit(variant, request):
    """`parallelize` on one rank returns the object the pipeline calls; its forward (ours, with the
    layout's split points and the attention seam) must give diffusers' bits. If this fails, the
    copied forward or block arithmetic drifted from diffusers' (A14B's per-video or TI2V's per-token
    modulation), or `attention.sdpa` is not what diffusers' default backend computes."""
    folder = request.getfixturevalue(f"tiny_{variant}")
    model = load_expert_sharded(folder / "transformer", None, torch.device("cpu"), torch.float32)
    expert = parallelize(model, build_mesh(ParallelLayout(), torch.device("cpu")))
    x, t, context = _expert_inputs(model, timestep_per_token=variant == "ti2v")
    with torch.inference_mode():
        ref = model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
        got = expert(x, t, context)
    assert torch.equal(ref, got)
    assert not expert.can_widen


def test_every_attention_goes_through_the_attend_argument(tiny_i2v):
    """The attention seam: self- and cross-attention of every block call the `attend` handed to
    `parallelize`, in diffusers' (B, S, heads, head_dim) layout. If this fails, a kernel backend
    plugged in there would miss some attention."""
    model = load_expert_sharded(tiny_i2v / "transformer", None, torch.device("cpu"), torch.float32)
    shapes = []

    def attend(query, key, value):
        shapes.append((tuple(query.shape), tuple(key.shape)))
        return sdpa(query, key, value)

    expert = parallelize(model, build_mesh(ParallelLayout(), torch.device("cpu")), attend=attend)
    x, t, context = _expert_inputs(model, timestep_per_token=False)
    with torch.inference_mode():
        expert(x, t, context)
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    per_block = [
        ((1, 72, heads, head_dim), (1, 72, heads, head_dim)),
        ((1, 72, heads, head_dim), (1, 512, heads, head_dim)),
    ]
    assert shapes == per_block * model.config.num_layers


def test_sdpa_is_diffusers_default_attention_bit_for_bit():
    """`attention.sdpa` is today's behaviour: diffusers' `dispatch_attention_fn` with its default
    backend gives the same bits."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 37, 4, 16, generator=gen) for _ in range(3))
    assert torch.equal(sdpa(q, k, v), dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False))


def test_parallel_state_is_explicit():
    """Issue 26: no module-level registries, no hooks on the experts or the VAE, no private torch
    mesh API in the parallel package; the layout lives in the objects `parallelize`/`split_vae`
    return. If this fails, state is hidden again where the pipeline cannot see it."""
    import wan_spmd.parallel

    package = Path(wan_spmd.parallel.__file__).parent
    forbidden = ("WeakKeyDictionary", "register_forward_hook", "register_forward_pre_hook", "._flatten(")
    found = [f"{p.name}: {word}" for p in package.glob("*.py") for word in forbidden if word in p.read_text()]
    assert found == []
