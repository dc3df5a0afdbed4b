"""Model folders, the defaults order and the shipped presets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from wan_spmd.config import (
    ModelFolderError,
    check_tp,
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


def test_defaults_order_folder_toml_over_config_over_builtin(tiny_i2v, tmp_path):
    """generation.toml in the folder beats --config NAME, which beats the class's built-in preset."""
    info = inspect_model_folder(tiny_i2v)
    assert generation_defaults(info)["num_inference_steps"] == 4  # the tiny folder's own toml
    assert generation_defaults(info)["guidance_scale"] == 3.5  # from the built-in preset
    assert generation_defaults(info, "wan2.2-t2v-a14b")["guidance_scale"] == 4.0  # --config wins over built-in
    assert generation_defaults(info, "wan2.2-t2v-a14b")["num_inference_steps"] == 4  # folder toml wins over it
    assert info.boundary_ratio == 0.9 and info.is_i2v


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
    for exc in (ModelFolderError,):
        assert "\n" not in str(exc("x"))


def test_tp_size_must_divide_heads_and_ffn():
    check_tp({"num_attention_heads": 40, "ffn_dim": 13824}, 2)
    with pytest.raises(ValueError, match="40 attention heads do not split over tp=3"):
        check_tp({"num_attention_heads": 40, "ffn_dim": 13824}, 3)
    with pytest.raises(ValueError, match="ffn_dim 13824 does not split over tp=5"):
        check_tp({"num_attention_heads": 40, "ffn_dim": 13824}, 5)


def test_installed_package_ships_its_configs(tmp_path):
    """Without the source tree an installed wan_spmd must still find configs/*.toml (package data)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("wan_spmd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "wan_spmd/configs/wan2.2-i2v-a14b.toml" in names
    assert "wan_spmd/configs/wan2.2-t2v-a14b.toml" in names
