"""Model-folder facts and generation defaults, without torch.

The server and the CLI both need to know what a model folder is (I2V or T2V, its boundary_ratio,
its latent geometry) and which defaults apply before any weights load, so this module reads only
JSON and TOML.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The components a Wan2.2 A14B diffusers folder must have (model_index.json names them too).
REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer", "transformer_2")
PIPELINE_CONFIGS = {"WanImageToVideoPipeline": "wan2.2-i2v-a14b", "WanPipeline": "wan2.2-t2v-a14b"}
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
    }
)


TINY_VERSION = 1  # bump when the tiny layout changes, so stale caches are rebuilt
TINY_NAMES = {"tiny": "i2v", "tiny-i2v": "i2v", "tiny-t2v": "t2v"}
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
    """The folder, or None for a dummy model built from a named config."""
    pipeline_class: str
    """`WanImageToVideoPipeline` (I2V) or `WanPipeline` (T2V)."""
    boundary_ratio: float
    """Fraction of num_train_timesteps above which the high-noise expert runs."""
    transformer_config: dict[str, Any]
    """`transformer/config.json` (both experts share one architecture)."""
    vae_config: dict[str, Any] = field(default_factory=dict)
    """`vae/config.json`."""

    @property
    def is_i2v(self) -> bool:
        return self.pipeline_class == "WanImageToVideoPipeline"

    @property
    def config_name(self) -> str:
        return PIPELINE_CONFIGS[self.pipeline_class]

    @property
    def spatial_multiple(self) -> int:
        """Width and height must be multiples of this: VAE x8 times the patch size (2) = 16."""
        return 8 * int(self.transformer_config.get("patch_size", (1, 2, 2))[1])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {path}: {exc}") from None


def inspect_model_folder(path: str | Path) -> ModelInfo:
    """Check that `path` is a Wan2.2 A14B diffusers folder and read its facts."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {folder} does not exist; pass --model DIR (a diffusers-format Wan2.2 folder "
            "such as Wan-AI/Wan2.2-I2V-A14B-Diffusers) or --model tiny"
        )
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelFolderError(f"{folder} is not a diffusers model folder: model_index.json is missing")
    index = _read_json(index_path)
    cls = index.get("_class_name")
    if cls not in PIPELINE_CONFIGS:
        raise ModelFolderError(
            f"{folder} holds a {cls!r} pipeline, not Wan2.2 (expected one of {', '.join(sorted(PIPELINE_CONFIGS))})"
        )
    declared_missing = [c for c in REQUIRED_COMPONENTS if not (index.get(c) or [None])[0]]
    dirs_missing = [c for c in REQUIRED_COMPONENTS if not (folder / c).is_dir()]
    missing = sorted(set(declared_missing) | set(dirs_missing), key=REQUIRED_COMPONENTS.index)
    if missing:
        raise ModelFolderError(
            f"{folder} is not a Wan2.2 A14B folder: missing {', '.join(missing)} "
            "(a two-expert folder has tokenizer, text_encoder, vae, scheduler, transformer, transformer_2)"
        )
    if index.get("boundary_ratio") is None:
        raise ModelFolderError(f"{folder}/model_index.json has no boundary_ratio: not a Wan2.2 two-expert folder")
    for sub, name in (("transformer", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (folder / sub / name).is_file():
            raise ModelFolderError(f"{folder} is missing {sub}/{name}")
    return ModelInfo(
        path=folder,
        pipeline_class=cls,
        boundary_ratio=float(index["boundary_ratio"]),
        transformer_config=_read_json(folder / "transformer" / "config.json"),
        vae_config=_read_json(folder / "vae" / "config.json"),
    )


def check_tp(transformer_config: dict, tp_size: int) -> None:
    """Refuse a TP size the architecture cannot split evenly, naming the numbers."""
    heads = int(transformer_config["num_attention_heads"])
    ffn = int(transformer_config["ffn_dim"])
    if tp_size < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp_size}")
    if heads % tp_size:
        raise ValueError(f"{heads} attention heads do not split over tp={tp_size} ranks")
    if ffn % tp_size:
        raise ValueError(f"ffn_dim {ffn} does not split over tp={tp_size} ranks")


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
    """Defaults in DESIGN.md's order (later wins): built-in config of the pipeline class,
    `--config NAME`, the model folder's `generation.toml`. The request then overrides all."""
    defaults = load_builtin_config(info.config_name)
    if config_name:
        defaults.update(load_builtin_config(config_name))
    if info.path is not None and (info.path / "generation.toml").is_file():
        defaults.update(read_config_file(info.path / "generation.toml"))
    return defaults


def tiny_cache_dir(variant: str) -> Path:
    """Where the tiny checkpoint lives: the user's cache folder (XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wan_spmd" / f"tiny-{variant}-v{TINY_VERSION}"


def resolve_model(model: str, load_format: str = "auto") -> ModelInfo:
    """`tiny` / `tiny-t2v` (built on first use into the cache) or a local diffusers folder; with
    `load_format="dummy"` also a named real architecture (`wan2.2-i2v-a14b`) with no folder.

    Only a first build of the tiny model imports torch; checking a folder never does.
    """
    if load_format not in ("auto", "dummy"):
        raise ModelFolderError(f"--load-format must be auto or dummy, got {load_format!r}")
    if load_format == "dummy" and model in REAL_MODELS:
        return REAL_MODELS[model]
    if model in TINY_NAMES:
        folder = tiny_cache_dir(TINY_NAMES[model])
        if not (folder / "model_index.json").is_file():
            from wan_spmd.models import ensure_tiny

            folder = ensure_tiny(TINY_NAMES[model])
        return inspect_model_folder(folder)
    return inspect_model_folder(model)


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
REAL_MODELS = {
    "wan2.2-i2v-a14b": ModelInfo(
        None, "WanImageToVideoPipeline", 0.9, {**_A14B_TRANSFORMER, "in_channels": 36}, {"z_dim": 16}
    ),
    "wan2.2-t2v-a14b": ModelInfo(None, "WanPipeline", 0.875, {**_A14B_TRANSFORMER, "in_channels": 16}, {"z_dim": 16}),
}
