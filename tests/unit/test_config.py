"""Model folders, the defaults order and the shipped presets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from wan_spmd.config import (
    ModelFolderError,
    generation_defaults,
    inspect_model_folder,
    load_builtin_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_builtin_presets_carry_official_wan22_settings():
    """The official Wan2.2 A14B settings; T2V's guidance is high-noise 4.0, low-noise 3.0."""
    i2v, t2v = load_builtin_config("wan2.2-i2v-a14b"), load_builtin_config("wan2.2-t2v-a14b")
    assert (i2v["num_inference_steps"], i2v["flow_shift"], i2v["guidance_scale"], i2v["guidance_scale_2"]) == (
        40,
        5.0,
        3.5,
        3.5,
    )
    assert (i2v["num_frames"], i2v["fps"], i2v["max_area"]) == (81, 16, "1280x720")
    assert (t2v["num_inference_steps"], t2v["flow_shift"], t2v["guidance_scale"], t2v["guidance_scale_2"]) == (
        40,
        12.0,
        4.0,
        3.0,
    )
    assert (t2v["size"], t2v["num_frames"], t2v["fps"]) == ("1280x720", 81, 16)


def test_ti2v_preset_carries_the_official_ti2v_5b_settings():
    """Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py: 50 steps, shift 5.0, guidance 5.0, 121 frames at
    24 fps; 1280x704 (the only landscape size it supports) for text and as the image's area."""
    ti2v = load_builtin_config("wan2.2-ti2v-5b")
    assert (ti2v["num_inference_steps"], ti2v["flow_shift"], ti2v["guidance_scale"]) == (50, 5.0, 5.0)
    assert (ti2v["num_frames"], ti2v["fps"], ti2v["size"], ti2v["max_area"]) == (121, 24, "1280x704", "1280x704")
    assert "guidance_scale_2" not in ti2v


def test_ti2v_5b_dummy_architecture_is_the_public_one():
    """`--load-format dummy --model wan2.2-ti2v-5b`: the public 5B (30 layers, 24 heads of 128, FFN
    14336, 48 channels in and out) and the Wan2.2 VAE; its facts match its own family row, and
    TP 2, 4 and 8 split it while 3 does not (FFN 14336)."""
    from wan_spmd.config import REAL_MODELS
    from wan_spmd.families import match_family
    from wan_spmd.launch import ParallelLayout, check_layout, resolve_model

    info = resolve_model("wan2.2-ti2v-5b", load_format="dummy")
    assert info is REAL_MODELS["wan2.2-ti2v-5b"] and info.path is None
    cfg, vae = info.transformer_config, info.vae_config
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["ffn_dim"]) == (
        30,
        24,
        128,
        14336,
    )
    assert (cfg["in_channels"], cfg["out_channels"], cfg["text_dim"]) == (48, 48, 4096)
    assert (vae["z_dim"], vae["patch_size"], vae["scale_factor_spatial"], vae["is_residual"]) == (48, 2, 16, True)
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == 48
    assert match_family({"expand_timesteps": True}, cfg, vae, has_expert_2=False) is info.family
    for tp in (2, 4, 8):
        check_layout(ParallelLayout(tp=tp), cfg)
    with pytest.raises(ValueError, match="ffn_dim 14336 does not split over tp=3"):
        check_layout(ParallelLayout(tp=3), cfg)


def test_defaults_order_folder_toml_over_config_over_builtin(tiny_i2v, tmp_path):
    """generation.toml in the folder beats --config NAME, which beats the class's built-in preset."""
    info = inspect_model_folder(tiny_i2v)
    assert generation_defaults(info)["num_inference_steps"] == 4  # the tiny folder's own toml
    assert generation_defaults(info)["guidance_scale"] == 3.5  # from the built-in preset
    assert generation_defaults(info, "wan2.2-t2v-a14b")["guidance_scale"] == 4.0  # --config wins over built-in
    assert generation_defaults(info, "wan2.2-t2v-a14b")["num_inference_steps"] == 4  # folder toml wins over it
    assert info.boundary_ratio == 0.9 and info.family.name == "wan2.2-i2v-a14b"


def test_model_folder_errors_name_what_is_missing(tiny_i2v, tmp_path):
    """A folder missing a component, or of another pipeline, is refused with one line naming it."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_i2v, broken)
    shutil.rmtree(broken / "transformer_2")
    with pytest.raises(ModelFolderError, match="missing transformer_2"):
        inspect_model_folder(broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match="not Wan2.2"):
        inspect_model_folder(broken)
    with pytest.raises(ModelFolderError, match="model_index.json is missing"):
        inspect_model_folder(tmp_path)


def test_a_hub_id_says_how_to_download_it(tmp_path, monkeypatch):
    """`--model Wan-AI/...` with no such folder here names the download command for that repo and
    the --model to pass after it; another missing path says the same in general. If this fails, a
    newcomer copying the repo id from the model card is told only that a folder is missing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFolderError) as hub:
        inspect_model_folder("Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    message = str(hub.value)
    assert (
        "huggingface-cli download Wan-AI/Wan2.2-TI2V-5B-Diffusers --local-dir ~/models/Wan2.2-TI2V-5B-Diffusers"
        in message
    )
    assert "--model ~/models/Wan2.2-TI2V-5B-Diffusers" in message and "\n" not in message
    with pytest.raises(ModelFolderError, match="does not exist; .*huggingface-cli download .* --local-dir DIR"):
        inspect_model_folder(tmp_path / "nowhere" / "x")


def _write_folder(root: Path, index: dict, transformer: dict, vae: dict, experts: tuple[str, ...]) -> Path:
    """A model folder's JSON facts only (inspect_model_folder reads no weights)."""
    for component in ("tokenizer", "text_encoder", "scheduler", *experts):
        (root / component).mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    for name in experts:
        (root / name / "config.json").write_text(json.dumps(transformer))
    (root / "vae" / "config.json").write_text(json.dumps(vae))
    declared = {c: ["x", "y"] for c in ("tokenizer", "text_encoder", "scheduler", "vae", *experts)}
    (root / "model_index.json").write_text(json.dumps({**index, **declared}))
    return root


def test_ti2v_folder_is_matched_by_its_facts_not_its_class_name(tmp_path):
    """The official TI2V-5B folder declares `WanPipeline`, as T2V-A14B does: if this fails, the family
    is read from `_class_name` (or two experts are assumed) and TI2V would be served as T2V."""
    folder = _write_folder(
        tmp_path / "ti2v",
        {"_class_name": "WanPipeline", "expand_timesteps": True, "transformer_2": [None, None]},
        {"in_channels": 48, "out_channels": 48, "num_attention_heads": 24, "ffn_dim": 14336},
        {"z_dim": 48},
        ("transformer",),
    )
    info = inspect_model_folder(folder)
    assert info.family.name == "wan2.2-ti2v-5b"
    assert (info.family.experts, info.family.image, info.spatial_multiple) == (1, "optional", 32)
    assert info.boundary_ratio is None


def test_a14b_folders_match_their_rows_and_odd_facts_are_refused(tmp_path):
    """Two experts with 36 input channels are I2V, with 16 T2V, whatever the class name says; facts
    that match no row are refused with one line naming them."""
    t2v = _write_folder(
        tmp_path / "t2v",
        {"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.875},
        {"in_channels": 16},
        {"z_dim": 16},
        ("transformer", "transformer_2"),
    )
    assert inspect_model_folder(t2v).family.name == "wan2.2-t2v-a14b"
    odd = _write_folder(
        tmp_path / "odd", {"_class_name": "WanPipeline"}, {"in_channels": 20}, {"z_dim": 16}, ("transformer",)
    )
    with pytest.raises(ModelFolderError, match=r"no Wan2.2 family matches this folder \(experts=1.*in_channels=20\)"):
        inspect_model_folder(odd)
