"""LoRAs fused at load against diffusers' own `load_lora_weights` + `fuse_lora`, and against a hand
merge for the keys diffusers drops, on the tiny I2V model; plus the one-line refusals.

If these fail, a LoRA changes the experts differently from what diffusers (or the textbook merge)
does: a key converted to the wrong module, alpha/rank or the user's scale applied twice or not at
all, a bias/norm/modulation delta lost, or the high/low expert mixed up.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

from tests.conftest import EXAMPLE_IMAGE
from tests.diffusers_ref import i2v_reference_latents
from tests.lora_files import hand_merge, write_peft, write_wan
from wan_spmd.config import generation_defaults, inspect_model_folder
from wan_spmd.launch import parse_lora_spec
from wan_spmd.lora import LoraError, check_loras
from wan_spmd.models import load_components
from wan_spmd.params import resolve_params
from wan_spmd.pipeline import WanVideoPipeline

TOLERANCE = 1e-4  # latents, float32 rounding


def _params(info):
    return resolve_params(
        {"prompt": "a kite", "guidance_scale": 3.5, "guidance_scale_2": 2.0, "seed": 3},
        info=info,
        defaults=generation_defaults(info),
        image=EXAMPLE_IMAGE.read_bytes(),
    )


def _ours(info, specs, params):
    comps = load_components(info, torch.device("cpu"), loras=tuple(specs))
    return comps, WanVideoPipeline(comps, info, torch.device("cpu")).generate_latents(params).latents


def _diffusers_fused(info, high, low):
    """diffusers' load_lora_weights + fuse_lora: `high` into transformer, `low` into transformer_2."""
    comps = load_components(info, torch.device("cpu"))
    pipe = WanImageToVideoPipeline(
        tokenizer=comps.tokenizer,
        text_encoder=comps.text_encoder,
        vae=comps.vae,
        scheduler=comps.scheduler,
        transformer=comps.transformer,
        transformer_2=comps.transformer_2,
    )
    for i, (path, scale) in enumerate(high):
        pipe.load_lora_weights(str(path), adapter_name=f"high{i}")
        pipe.fuse_lora(components=["transformer"], lora_scale=scale, adapter_names=[f"high{i}"])
    for i, (path, scale) in enumerate(low):
        pipe.load_lora_weights(str(path), adapter_name=f"low{i}", load_into_transformer_2=True)
        pipe.fuse_lora(components=["transformer_2"], lora_scale=scale, adapter_names=[f"low{i}"])
    return comps


def _plain_state(model) -> dict[str, torch.Tensor]:
    """A (possibly PEFT-wrapped, fused) expert's weights under the plain module names."""
    state = {}
    for name, value in model.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = value
    return state


@pytest.mark.parametrize(
    "fmt",
    ["peft", "peft-alpha", "wan"],
)
def test_matches_diffusers_load_and_fuse(fmt, tiny_i2v, tmp_path):
    """One LoRA per expert (high at 0.7, low at 1.3) in each format diffusers converts, fused by us
    per slice at load and by diffusers' load_lora_weights/fuse_lora: the same weights and latents."""
    info = inspect_model_folder(tiny_i2v)
    params = _params(info)
    write = {
        "peft": lambda p, s: write_peft(p, s),
        "peft-alpha": lambda p, s: write_peft(p, s, rank=4, alpha=8.0),
        "wan": lambda p, s: write_wan(p, s, rank=4, alpha=2.0),
    }[fmt]
    high, low = write(tmp_path / "high.safetensors", 1), write(tmp_path / "low.safetensors", 2)
    specs = [parse_lora_spec(f"{high}:0.7", "--lora-high"), parse_lora_spec(f"{low}:1.3", "--lora-low")]
    ours, ours_latents = _ours(info, specs, params)
    ref = _diffusers_fused(info, [(high, 0.7)], [(low, 1.3)])
    for mine, theirs in zip(ours.experts, ref.experts, strict=True):
        theirs_state = _plain_state(theirs)
        for name, value in mine.state_dict().items():
            assert torch.allclose(value, theirs_state[name], atol=1e-6), name
    base = load_components(info, torch.device("cpu"))
    moved = (ours.transformer.blocks[0].attn1.to_q.weight - base.transformer.blocks[0].attn1.to_q.weight).abs()
    assert moved.max() > 1e-3  # the LoRA did something
    ref_latents = i2v_reference_latents(ref, params)
    assert (ours_latents - ref_latents).abs().max().item() <= TOLERANCE
    base_latents = WanVideoPipeline(base, info, torch.device("cpu")).generate_latents(params).latents
    assert (ours_latents - base_latents).abs().max().item() > 1e-2


def test_keys_diffusers_drops_match_a_hand_merge(tiny_i2v, tmp_path):
    """A lightx2v-style file with norm .diff/.diff_b, .diff_m and a full .diff of a linear (all
    dropped by diffusers 0.42) plus the usual pairs, on every expert at 0.8: our fused weights and
    latents equal the textbook merge's."""
    info = inspect_model_folder(tiny_i2v)
    params = _params(info)
    path = write_wan(tmp_path / "distill.safetensors", 5, diffs=True, head_alpha=True)
    ours, ours_latents = _ours(info, [parse_lora_spec(f"{path}:0.8")], params)
    base = load_components(info, torch.device("cpu"))
    for i, expert in enumerate(base.experts):
        merged = hand_merge(expert.state_dict(), path, 0.8)
        model = WanTransformer3DModel.from_config(expert.config)
        model.load_state_dict(merged)
        base.experts[i] = model.eval()
        for name, value in ours.experts[i].state_dict().items():
            assert torch.allclose(value, merged[name], atol=1e-6), name
    assert not torch.equal(
        ours.transformer.blocks[1].norm2.bias,
        load_components(info, torch.device("cpu")).transformer.blocks[1].norm2.bias,
    )
    ref_latents = i2v_reference_latents(base, params)
    assert (ours_latents - ref_latents).abs().max().item() <= TOLERANCE


def test_wan21_image_branch_keys_are_skipped_with_a_count(tiny_i2v, tmp_path, caplog):
    """Wan2.1 I2V LoRAs carry k_img/v_img/norm_k_img/img_emb keys Wan2.2 lacks: skipped, counted
    in one warning, and the rest fused as without them."""
    info = inspect_model_folder(tiny_i2v)
    with_img = write_wan(tmp_path / "i2v21.safetensors", 7, image_branch=True)
    without = write_wan(tmp_path / "plain.safetensors", 7)
    with caplog.at_level("WARNING", logger="wan_spmd"):
        (report,) = check_loras((parse_lora_spec(str(with_img)),), info.transformer_config, ("transformer",))
    # per block: k_img and v_img (down, up, alpha) + norm_k_img.diff = 7; img_emb down + up = 2
    assert report.skipped_image_keys == 2 * 7 + 2
    assert "skipped 16 key(s) of Wan2.1 I2V's image branch" in caplog.text
    a = load_components(info, torch.device("cpu"), loras=(parse_lora_spec(str(with_img)),))
    b = load_components(info, torch.device("cpu"), loras=(parse_lora_spec(str(without)),))
    for x, y in zip(a.experts, b.experts, strict=True):
        for (name, p), q in zip(x.state_dict().items(), y.state_dict().values(), strict=True):
            assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"diffusion_model.blocks.0.self_attn.zz.lora_down.weight": torch.zeros(4, 48)},
            "keys that match no module of a Wan2.2 expert: 'diffusion_model.blocks.0.self_attn.zz.lora_down.weight'",
        ),
        (
            {
                "diffusion_model.blocks.7.ffn.0.lora_down.weight": torch.zeros(4, 48),
                "diffusion_model.blocks.7.ffn.0.lora_up.weight": torch.zeros(64, 4),
            },
            "blocks.7.ffn.net.0.proj is not a module of this model",
        ),
        (
            {"diffusion_model.blocks.0.norm3.diff": torch.zeros(5120)},
            "blocks.0.norm2.weight: the LoRA's delta is (5120,) but the model's is (48,)",
        ),
    ],
)
def test_bad_files_are_refused_with_one_line(tiny_i2v, tmp_path, extra, message):
    """An unknown key, a module the model lacks, a shape of another model size: LoraError naming it,
    already on meta tensors (the CLI's check)."""
    info = inspect_model_folder(tiny_i2v)
    path = write_wan(tmp_path / "bad.safetensors", 1, extra=extra)
    with pytest.raises(LoraError) as err:
        check_loras((parse_lora_spec(str(path)),), info.transformer_config, ("transformer", "transformer_2"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("LoRA bad.safetensors: ")


def _peft_with_metadata(path, metadata: str):
    from safetensors.torch import save_file

    tensors = {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 48),
        "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(48, 4),
    }
    save_file(tensors, path, metadata={"lora_adapter_metadata": metadata})
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: write_wan(p, 1, alpha=float("nan")), "alpha must be one finite number, got nan"),
        (lambda p: write_wan(p, 1, alpha=float("inf"), head_alpha=True), "alpha must be one finite number, got inf"),
        (lambda p: write_wan(p, 1, rank=0), "has rank 0"),
        (lambda p: _peft_with_metadata(p, "{not json"), "lora_adapter_metadata is not valid JSON"),
        (lambda p: _peft_with_metadata(p, '{"r": 4, "lora_alpha": NaN}'), "lora_alpha must be a finite number"),
        (lambda p: _peft_with_metadata(p, '{"r": 0, "lora_alpha": 4}'), "rank r must be a number >= 1"),
    ],
    ids=["alpha NaN", "alpha inf", "rank 0", "metadata not JSON", "metadata alpha NaN", "metadata rank 0"],
)
def test_bad_alpha_rank_and_metadata_are_refused_with_one_line(tiny_i2v, tmp_path, make, message):
    """A NaN or infinite alpha, rank 0, metadata that is not JSON or holds no usable alpha/rank:
    one LoraError line naming the file. If this fails, a NaN alpha silently poisons every fused
    weight (black videos), and rank 0 or bad metadata end in a traceback that names no file."""
    info = inspect_model_folder(tiny_i2v)
    path = make(tmp_path / "bad.safetensors")
    with pytest.raises(LoraError) as err:
        check_loras((parse_lora_spec(str(path)),), info.transformer_config, ("transformer", "transformer_2"))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert str(err.value).startswith("LoRA bad.safetensors: ")


def test_wrong_rank_shape_names_both_shapes(tiny_i2v, tmp_path):
    """A LoRA for a bigger model: the module and both shapes in the message."""
    info = inspect_model_folder(tiny_i2v)
    path = tmp_path / "big.safetensors"
    from safetensors.torch import save_file

    save_file(
        {
            "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 5120),
            "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(5120, 4),
        },
        path,
    )
    with pytest.raises(
        LoraError, match=r"blocks.0.attn1.to_q: the LoRA makes \(5120, 5120\) .* model's weight is \(48, 48\)"
    ):
        check_loras((parse_lora_spec(str(path)),), info.transformer_config, ("transformer",))


@pytest.mark.parametrize(
    "text, message",
    [
        ("missing.safetensors", "--lora missing.safetensors: no such file"),
        ("{lora}:abc", "scale 'abc' is not a number"),
        ("{lora}:inf", "scale must be a finite number"),
    ],
)
def test_spec_parsing(tmp_path, text, message):
    lora = write_peft(tmp_path / "x.safetensors", 0)
    with pytest.raises(ValueError, match=message):
        parse_lora_spec(text.format(lora=lora))


def test_spec_names_by_content_not_path(tmp_path):
    """/v1/models and the logs name a LoRA by file name, scale and content hash: the same bytes in
    another folder give the same card, other bytes another hash."""
    a = write_peft(tmp_path / "style.safetensors", 0)
    (tmp_path / "other").mkdir()
    b = write_peft(tmp_path / "other" / "style.safetensors", 0)
    c = write_peft(tmp_path / "c.safetensors", 1)
    card = parse_lora_spec(f"{a}:0.5", "--lora-low").card()
    assert card == parse_lora_spec(f"{b}:0.5", "--lora-low").card()
    assert card == {"name": "style.safetensors", "scale": 0.5, "experts": "low", "sha256": card["sha256"]}
    assert len(card["sha256"]) == 12 and str(tmp_path) not in str(card)
    assert parse_lora_spec(str(c)).sha256 != card["sha256"]
