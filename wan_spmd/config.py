"""Model-folder facts and generation defaults, without torch; a leaf (it imports only `families`).

The server and the CLI both need to know what a model folder is (its family, boundary_ratio,
latent geometry) and which defaults apply before any weights load, so this module reads only
JSON and TOML.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_spmd.families import FAMILIES, Family, UnknownFamily, match_family

# Every Wan2.2 folder has these; `transformer_2` only where its family has two experts.
BASE_COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")
# Keys a generation table may set; anything else in a toml is a mistake worth naming.
DEFAULT_KEYS = frozenset(
    {
        "negative_prompt",
        "num_inference_steps",
        "guidance_scale",
        "guidance_scale_2",
        "flow_shift",
        "num_frames",
        "fps",
        "size",
        "max_area",
        "seed",
        "scheduler",
    }
)


TINY_VERSION = 2  # bump when the tiny layout changes, so stale caches are rebuilt
TINY_NAMES = {"tiny": "i2v", "tiny-i2v": "i2v", "tiny-t2v": "t2v", "tiny-ti2v": "ti2v"}
TINY_NOTE = (
    "model 'tiny' is a tiny randomly initialised Wan2.2 checkpoint: it makes noise, not art. "
    "For real videos pass --model /path/to/Wan2.2-I2V-A14B-Diffusers (a local diffusers-format folder)."
)


class ModelFolderError(ValueError):
    """A model folder that is not a usable Wan2.2 diffusers folder (one line, names what is wrong)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the model folder says about itself; never overridden by a toml."""

    path: Path | None
    """The folder, or None for a dummy model built from a named architecture."""
    family: Family
    """The row of `families.FAMILIES` the folder's facts match."""
    boundary_ratio: float | None
    """Fraction of num_train_timesteps above which the high-noise expert runs; None for one expert."""
    transformer_config: dict[str, Any]
    """`transformer/config.json` (two experts share one architecture)."""
    vae_config: dict[str, Any] = field(default_factory=dict)
    """`vae/config.json`."""

    @property
    def config_name(self) -> str:
        """The built-in preset of the family."""
        return self.family.name

    @property
    def spatial_multiple(self) -> int:
        return self.family.spatial_multiple


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {path}: {exc}") from None


def _declared(index: dict[str, Any], name: str) -> bool:
    return bool((index.get(name) or [None])[0])


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
"""owner/name, as the Hugging Face Hub names a repo (a relative path of two parts looks the same:
the message only applies when no such folder exists)."""


def inspect_model_folder(path: str | Path) -> ModelInfo:
    """Check that `path` is a Wan2.2 diffusers folder, read its facts and match its family."""
    folder = Path(path).expanduser()
    if not folder.is_dir() and HUB_ID.fullmatch(str(path)):
        local = f"~/models/{str(path).split('/')[1]}"
        raise ModelFolderError(
            f"--model {path} is a Hugging Face repo id, not a folder here; wan_spmd reads local folders only. "
            f"Download it first (pip install huggingface_hub): huggingface-cli download {path} --local-dir {local}, "
            f"then pass --model {local} (or --model tiny for the tiny demo model)"
        )
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {folder} does not exist; pass --model DIR (a diffusers-format Wan2.2 folder, "
            "downloaded with huggingface-cli download Wan-AI/Wan2.2-I2V-A14B-Diffusers --local-dir DIR) "
            "or --model tiny"
        )
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelFolderError(f"{folder} is not a diffusers model folder: model_index.json is missing")
    index = _read_json(index_path)
    cls = index.get("_class_name")
    # Only a sanity check that this is a Wan pipeline at all; the family comes from the facts below.
    if not isinstance(cls, str) or not cls.startswith("Wan"):
        raise ModelFolderError(f"{folder} holds a {cls!r} pipeline, not Wan2.2")
    expert_2 = _declared(index, "transformer_2")
    wanted = (*BASE_COMPONENTS, "transformer_2") if expert_2 else BASE_COMPONENTS
    missing = [c for c in wanted if not _declared(index, c) or not (folder / c).is_dir()]
    if missing:
        raise ModelFolderError(
            f"{folder} is not a complete Wan2.2 folder: missing {', '.join(missing)} (it needs {', '.join(wanted)})"
        )
    for sub, name in (("transformer", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (folder / sub / name).is_file():
            raise ModelFolderError(f"{folder} is missing {sub}/{name}")
    transformer_config = _read_json(folder / "transformer" / "config.json")
    vae_config = _read_json(folder / "vae" / "config.json")
    try:
        family = match_family(index, transformer_config, vae_config, expert_2)
    except UnknownFamily as exc:
        raise ModelFolderError(f"{folder}: {exc}") from None
    boundary = index.get("boundary_ratio")
    if family.experts == 2 and boundary is None:
        raise ModelFolderError(f"{folder}/model_index.json has no boundary_ratio: not a Wan2.2 two-expert folder")
    return ModelInfo(
        path=folder,
        family=family,
        boundary_ratio=float(boundary) if family.experts == 2 else None,
        transformer_config=transformer_config,
        vae_config=vae_config,
    )


def builtin_config_dir() -> Path:
    """The shipped `configs/` folder: installed as package data, or the source tree's."""
    installed = Path(__file__).parent / "configs"
    return installed if installed.is_dir() else Path(__file__).parent.parent / "configs"


def builtin_config_names() -> list[str]:
    return sorted(p.stem for p in builtin_config_dir().glob("*.toml"))


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a toml's `[generation]` table, refusing keys we do not know."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelFolderError(f"cannot read config {path}: {exc}") from None
    table = data.get("generation", {})
    unknown = sorted(set(table) - DEFAULT_KEYS)
    if unknown:
        raise ModelFolderError(f"config {path} has unknown keys {', '.join(unknown)}")
    return dict(table)


def load_builtin_config(name: str) -> dict[str, Any]:
    path = builtin_config_dir() / f"{name}.toml"
    if not path.is_file():
        raise ModelFolderError(f"no built-in config {name!r}; known: {', '.join(builtin_config_names())}")
    return read_config_file(path)


def generation_defaults(info: ModelInfo, config_name: str | None = None) -> dict[str, Any]:
    """Defaults in DESIGN.md's order (later wins): built-in preset of the folder's family,
    `--config NAME`, the model folder's `generation.toml`. The request then overrides all."""
    defaults = load_builtin_config(info.config_name)
    if config_name:
        defaults.update(load_builtin_config(config_name))
    if info.path is not None and (info.path / "generation.toml").is_file():
        defaults.update(read_config_file(info.path / "generation.toml"))
    return defaults


TINY_MARK = "# Written by `wan_spmd make-tiny`: a tiny random model, noise not art."
"""The first line of a tiny checkpoint's generation.toml: how make-tiny knows a folder it may overwrite."""


def is_tiny_folder(folder: Path) -> bool:
    try:
        with (folder / "generation.toml").open() as toml:
            return toml.readline().rstrip("\n") == TINY_MARK
    except (OSError, UnicodeDecodeError):
        return False


def tiny_cache_dir(variant: str) -> Path:
    """Where the tiny checkpoint lives: the user's cache folder (XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wan_spmd" / f"tiny-{variant}-v{TINY_VERSION}"


# The real architectures (diffusers' conversion script and the public Wan-AI/*-Diffusers configs),
# for `--load-format dummy` where no folder exists. With a folder, its own files win.
_A14B_TRANSFORMER = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
UMT5_XXL_ENCODER = {
    "d_model": 4096,
    "num_layers": 24,
    "num_heads": 64,
    "d_kv": 64,
    "d_ff": 10240,
    "feed_forward_proj": "gated-gelu",
    "vocab_size": 256384,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
}
# TI2V-5B: diffusers' scripts/convert_wan_to_diffusers.py ("Wan2.2-TI2V-5B" and vae22_diffusers_config),
# which agrees with Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py (dim 3072 = 24 heads x 128, ffn 14336,
# 30 layers, VAE stride (4, 16, 16)).
_TI2V_5B_TRANSFORMER = {
    **_A14B_TRANSFORMER,
    "num_attention_heads": 24,
    "ffn_dim": 14336,
    "num_layers": 30,
    "in_channels": 48,
    "out_channels": 48,
}
# The 48 latent statistics 12 a line, not one a line.
# fmt: off
WAN22_VAE = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_temporal": 4,
    "scale_factor_spatial": 16,
    "latents_mean": [
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
        0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
        -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ],
    "latents_std": [
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
        0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
        0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ],
}
# fmt: on
REAL_MODELS = {
    "wan2.2-i2v-a14b": ModelInfo(
        None, FAMILIES["wan2.2-i2v-a14b"], 0.9, {**_A14B_TRANSFORMER, "in_channels": 36}, {"z_dim": 16}
    ),
    "wan2.2-t2v-a14b": ModelInfo(
        None, FAMILIES["wan2.2-t2v-a14b"], 0.875, {**_A14B_TRANSFORMER, "in_channels": 16}, {"z_dim": 16}
    ),
    "wan2.2-ti2v-5b": ModelInfo(None, FAMILIES["wan2.2-ti2v-5b"], None, _TI2V_5B_TRANSFORMER, WAN22_VAE),
}
