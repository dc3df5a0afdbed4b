"""The placement planner: pure arithmetic over a model's facts, the layout and a budget (no torch)."""

from __future__ import annotations

import pytest

from wan_spmd.config import REAL_MODELS, UMT5_XXL_ENCODER
from wan_spmd.memory import (
    GIB,
    NO_BUDGET,
    PLACEMENTS,
    BudgetTooSmall,
    Request,
    activations,
    expert_params,
    parse_gpu_memory,
    plan_for,
    umt5_encoder_params,
    weights_for,
)

I2V = REAL_MODELS["wan2.2-i2v-a14b"]
T2V = REAL_MODELS["wan2.2-t2v-a14b"]
TI2V = REAL_MODELS["wan2.2-ti2v-5b"]
H100 = int(79.6 * GIB)  # an 80 GB H100: 81,559 MiB
P720 = Request(1280, 720, 81, 75_600, image_condition=True)
P720_T2V = Request(1280, 720, 81, 75_600, image_condition=False)
P480 = Request(832, 480, 81, 32_760, image_condition=True)
TI2V_720 = Request(1280, 704, 121, 27_280, image_condition=False)


def test_parameter_counts_match_the_published_sizes():
    """If this fails, the architecture arithmetic drifted from diffusers' models: A14B experts have
    14.29 B parameters, UMT5-XXL's encoder 5.68 B, TI2V-5B's transformer 5.0 B (GPU.md, diffusers)."""
    total, linear = expert_params(I2V.transformer_config)
    assert round(total / 1e9, 2) == 14.29
    assert 0.98 < linear / total < 0.99  # the blocks' linears: what TP splits and fp8 halves
    assert round(umt5_encoder_params(UMT5_XXL_ENCODER) / 1e9, 2) == 5.68
    assert round(expert_params(TI2V.transformer_config)[0] / 1e9, 1) == 5.0


def test_weights_per_rank_follow_tp_and_fp8():
    """If this fails, a rank's weight bytes ignore how TP splits the experts or what fp8 stores:
    the plan would offload what fits or load what does not."""
    whole = weights_for(I2V)
    assert round(whole.expert / GIB, 1) == 26.6 and round(whole.text_encoder / GIB, 1) == 10.6
    tp2 = weights_for(I2V, tp=2)
    assert round(tp2.expert / GIB, 1) == 13.5  # half the linears, the rest whole
    assert tp2.text_encoder == whole.text_encoder and tp2.vae == whole.vae  # whole on every rank
    fp8 = weights_for(I2V, quant="fp8")
    assert round(fp8.expert / GIB, 1) == 13.5  # one byte per linear weight
    assert weights_for(I2V, vae_dtype="bf16").vae * 2 == whole.vae


def test_activation_model_is_calibrated_on_the_measured_figures():
    """If this fails, the activation model no longer reproduces what was measured on H200s:
    +8.2 GiB per 720p forward on one GPU (8.9 modelled, on the safe side), +4.8 GiB per rank with
    TP=2 and sequence regions, +20 GiB for the fp32 VAE decode at 720p (half in bf16)."""
    one = activations(P720, I2V.transformer_config)
    assert 8.2 <= one.denoise / GIB <= 9.0
    assert round(activations(P720, I2V.transformer_config, tp=2, world_size=2).denoise / GIB, 1) == 4.8
    assert round(one.decode / GIB, 1) == 20.0
    assert round(activations(P720, I2V.transformer_config, vae_dtype="bf16").decode / GIB, 1) == 10.0
    # the VAE split by rows over 2 ranks halves its working memory; rank 0 alone keeps all of it
    assert activations(P720, I2V.transformer_config, world_size=2).decode * 2 == one.decode
    assert activations(P720, I2V.transformer_config, world_size=2, parallel_vae=False).decode == one.decode
    assert activations(P720_T2V, T2V.transformer_config).vae_encode == 0  # T2V encodes no video


def test_everything_resident_on_one_h200_matches_the_measured_peak():
    """If this fails, the plan's expected peak moved away from serve's measured 96,055 MiB
    (93.8 GiB, nvidia-smi) for I2V-A14B at 1280x720x81 with everything resident on one H200."""
    plan = plan_for(I2V, P720, int(139 * GIB))
    assert plan.placement == "resident"
    assert 93.0 <= plan.peak / GIB <= 96.0


def test_tp2_on_two_80gb_cards_needs_no_offload_at_720p():
    """If this fails, the planner would slow I2V-A14B at 720p on two 80 GB cards with an offload it
    does not need: each rank holds half the experts (40.1 GiB after load measured, 55.8 GiB peak)."""
    plan = plan_for(I2V, P720, H100, tp=2, world_size=2)
    assert plan.placement == "resident" and plan.fits
    assert plan.peak < 60 * GIB and plan.host_bytes == 0 and plan.moved_per_request == 0


def test_one_80gb_card_at_720p_chooses_an_offload():
    """If this fails, the planner lets I2V-A14B at 1280x720x81 load everything on one 80 GB card,
    which runs out (96 GB measured), or with only the text encoder off (it ran out in the decode)."""
    plan = plan_for(I2V, P720, H100)
    assert plan.placement == "experts"
    assert plan.peak <= H100
    assert plan.on_card["transformer"].startswith("host") and plan.on_card["text_encoder"].startswith("host")
    assert round(plan.host_bytes / GIB, 1) == 63.8  # both experts and the text encoder, pinned
    # 480p fits with the text encoder moved off only: the cheapest placement that fits
    assert plan_for(I2V, P480, H100).placement == "text_encoder"


def test_fp8_fits_48gb_and_ti2v_fits_24gb_with_a_bf16_vae():
    """If this fails, the planner cannot place the issue's smaller cards: A14B with fp8 experts on
    48 GB (priced at 41.6 GiB with the experts offloaded, which fp8 weights cannot do yet: refused
    with that number), TI2V-5B at 1280x704x121 on 24 GB (with the bf16 VAE; fp32's decode needs tiling)."""
    fp8 = Request(1280, 720, 81, 75_600, image_condition=True)
    with pytest.raises(BudgetTooSmall, match="only 'experts' fits .*41.6 GiB.* not do with --tp or --quant fp8 yet"):
        plan_for(I2V, fp8, 48 * GIB, quant="fp8")  # priced; the offload of fp8 weights is not built
    assert plan_for(TI2V, TI2V_720, 24 * GIB, vae_dtype="bf16").placement == "experts"
    with pytest.raises(BudgetTooSmall, match="only 'vae_tiled' fits .* which this version does not do yet"):
        plan_for(TI2V, TI2V_720, 24 * GIB)


def test_a_budget_nothing_fits_is_refused_with_the_numbers():
    """If this fails, a too-small --gpu-memory would load and run out mid-request instead of being
    refused up front with one line that names the budget, the request and what it needs."""
    with pytest.raises(BudgetTooSmall) as caught:
        plan_for(I2V, P720, 8 * GIB)
    message = str(caught.value)
    assert "\n" not in message
    assert "--gpu-memory 8.0 GiB per card is too small for 1280x720x81 (75600 tokens)" in message
    assert "needs" in message and "weights per rank 64.3 GiB" in message


def test_experts_are_not_offloaded_under_tp():
    """If this fails, the plan asks a tensor-parallel rank to move its DTensor slices to the host,
    which the offload does not do: under --tp only the text encoder is offloaded."""
    with pytest.raises(BudgetTooSmall, match="does not do with --tp or --quant fp8 yet"):
        plan_for(I2V, P720, 40 * GIB, tp=2, world_size=2)
    with pytest.raises(ValueError, match="not carried out here"):
        plan_for(I2V, P720, H100, tp=2, world_size=2, offload="experts")


@pytest.mark.parametrize("info", [I2V, T2V, TI2V], ids=lambda i: i.family.name)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_family_and_layout_gets_the_cheapest_plan_that_fits(info, tp):
    """If this fails, for some family and layout the planner picks a placement that does not fit,
    or a costlier one while a cheaper one fits (a silent slowdown), or prices offload wrongly."""
    request = Request(1280, 704 if info.family.vae_z_dim == 48 else 720, 81, 40_000, info.family.takes_image)
    for budget_gib in (16, 24, 32, 48, 64, 80, 96, 141):
        budget = budget_gib * GIB
        try:
            chosen = plan_for(info, request, budget, tp=tp, world_size=tp)
        except BudgetTooSmall:
            chosen = None
        for name in PLACEMENTS[: PLACEMENTS.index(chosen.placement) if chosen else 3]:
            if tp > 1 and name == "experts":
                continue
            cheaper = plan_for(info, request, NO_BUDGET, tp=tp, world_size=tp, offload=_flag(name))
            assert cheaper.peak > budget, (name, budget_gib)  # nothing cheaper fits
        if chosen is not None:
            assert chosen.peak <= budget
            assert chosen.host_bytes == chosen.moved_per_request  # each offloaded byte comes back once a request


def _flag(placement: str) -> str:
    return {"resident": "none", "text_encoder": "text-encoder", "experts": "experts"}[placement]


def test_budget_flag_takes_gib_a_fraction_or_auto():
    """If this fails, --gpu-memory misreads its value (0.9 of the card as 0.9 GiB, or the reverse),
    or accepts a budget it cannot know (a fraction on a machine without a GPU)."""
    card = 80 * GIB
    assert parse_gpu_memory("48", card) == 48 * GIB
    assert parse_gpu_memory("0.9", card) == int(0.9 * card)
    assert parse_gpu_memory("auto", card) == card
    assert parse_gpu_memory("24", None) == 24 * GIB
    for bad in ("-1", "0", "nan", "lots", "inf"):
        with pytest.raises(ValueError, match="--gpu-memory"):
            parse_gpu_memory(bad, card)
    with pytest.raises(ValueError, match="no GPU"):
        parse_gpu_memory("0.5", None)


def test_plan_line_says_where_everything_lives():
    """If this fails, the line logged at ready no longer tells what lives where, the expected peak
    and the host RAM needed."""
    line = plan_for(I2V, P720, H100).describe(ranks_per_host=1)
    assert "memory plan 'experts' for 1280x720x81 (75600 tokens)" in line
    assert "expected peak 70.7 GiB per card of 79.6 (at denoise;" in line
    assert "transformer host, on the card while it runs" in line and "vae card" in line
    assert "host RAM for offloaded weights 63.8 GiB per host" in line
    assert "per host" in plan_for(I2V, P480, H100).describe(ranks_per_host=8)
