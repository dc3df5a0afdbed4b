"""Launch-time choices, checked before torch loads: which model, and how the ranks split it.

Every rank of a torchrun job runs these checks on the same arguments, so a layout that cannot work
(a product that is not the world size, heads that do not split) stops every rank with the same one
line and exit 2 before any weights load.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan_spmd.config import REAL_MODELS, TINY_NAMES, ModelFolderError, ModelInfo, inspect_model_folder, tiny_cache_dir
from wan_spmd.families import Family
from wan_spmd.options import CACHE_BACKENDS, CACHE_DIT_REFUSED, cache_config_text, split_warmup_shapes


@dataclass(frozen=True)
class ParallelLayout:
    """How the world's ranks split one replica of the model. world_size = cfg x ulysses x tp.

    The mesh is laid out (cfg, ulysses, tp) with tp innermost, so a tensor-parallel group is made of
    neighbouring ranks (one host, NVLink) and only the cfg dimension may span hosts.
    """

    tp: int = 1
    """Tensor-parallel degree: heads and FFN hidden units split over this many ranks."""
    cfg: int = 1
    """1, or 2 when the guidance branches (conditional, unconditional) run on two rank groups."""
    ulysses: int = 1
    """Sequence-parallel (Ulysses) degree: tokens split, all-to-all to heads around attention."""

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.tp

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.cfg, self.ulysses, self.tp)

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def describe(self) -> str:
        parts = [f"tp={self.tp}"]
        if self.ulysses > 1:
            parts.append(f"ulysses={self.ulysses}")
        if self.cfg > 1:
            parts.append("cfg-parallel")
        return " ".join(parts)


def resolve_layout(
    world_size: int, tp: int | None = None, ulysses: int = 1, cfg_parallel: bool = False
) -> ParallelLayout:
    """The layout for `world_size` ranks; `tp` defaults to what the other dimensions leave, so a
    plain `torchrun --nproc-per-node N` is tensor parallelism over all N ranks, as before."""
    cfg = 2 if cfg_parallel else 1
    if ulysses < 1:
        raise ValueError(f"--ulysses must be >= 1, got {ulysses}")
    if tp is not None and tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if tp is None:
        if world_size % (cfg * ulysses):
            raise ValueError(
                f"world size {world_size} does not split into cfg={cfg} x ulysses={ulysses} groups "
                f"(torchrun --nproc-per-node must be a multiple of {cfg * ulysses})"
            )
        tp = world_size // (cfg * ulysses)
    layout = ParallelLayout(tp=tp, cfg=cfg, ulysses=ulysses)
    if layout.world_size != world_size:
        raise ValueError(
            f"cfg={cfg} x ulysses={ulysses} x tp={tp} = {layout.world_size} ranks, but the world size is {world_size}"
        )
    return layout


def check_layout(layout: ParallelLayout, transformer_config: dict[str, Any]) -> None:
    """Refuse a layout the architecture cannot split evenly, naming the numbers."""
    heads = int(transformer_config["num_attention_heads"])
    ffn = int(transformer_config["ffn_dim"])
    if heads % layout.tp:
        raise ValueError(f"{heads} attention heads do not split over tp={layout.tp} ranks")
    if ffn % layout.tp:
        raise ValueError(f"ffn_dim {ffn} does not split over tp={layout.tp} ranks")
    if layout.ulysses > 1 and (heads // layout.tp) % layout.ulysses:
        raise ValueError(
            f"{heads // layout.tp} attention heads per tp rank ({heads} over tp={layout.tp}) "
            f"do not split over ulysses={layout.ulysses}"
        )


def check_family(layout: ParallelLayout, family: Family) -> None:
    """Layouts a family cannot run yet: Ulysses does not cut TI2V's per-token timestep table."""
    if layout.ulysses > 1 and family.expand_timesteps:
        raise ValueError(
            f"--ulysses {layout.ulysses} is not supported for {family.name} (per-token timesteps) yet; "
            "use --tp or --cfg-parallel"
        )


def check_hosts(layout: ParallelLayout, ranks_per_host: int) -> None:
    """Only the cfg dimension may cross hosts: a tp x ulysses group (neighbouring ranks, tp
    innermost) must fit inside one host, whose `ranks_per_host` ranks torchrun numbers together
    (LOCAL_WORLD_SIZE). Its collectives run every layer; cfg's once per step."""
    group = layout.tp * layout.ulysses
    if ranks_per_host < layout.world_size and ranks_per_host % group:
        raise ValueError(
            f"tp={layout.tp} x ulysses={layout.ulysses} = {group} ranks per group would span hosts of "
            f"{ranks_per_host} rank(s) each: only the cfg dimension may cross hosts "
            "(use --cfg-parallel, or --nproc-per-node a multiple of the group)"
        )


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
            from wan_spmd.tiny import ensure_tiny

            folder = ensure_tiny(TINY_NAMES[model])
        return inspect_model_folder(folder)
    return inspect_model_folder(model)


WarmupShape = tuple[int, int, int]
"""(width, height, num_frames) of one warm-up request."""


def parse_warmup_shapes(text: str, spatial_multiple: int, max_frames: int = 161) -> tuple[WarmupShape, ...]:
    """`--warmup-shapes 1280x720x81,832x480x81` -> shapes; `none` -> (). Each must be a size the
    model can take (multiples of its spatial multiple, 4k+1 frames), else one line naming it."""
    shapes = []
    for item, width, height, frames in split_warmup_shapes(text):
        for name, value in (("width", width), ("height", height)):
            if value < spatial_multiple or value % spatial_multiple or value > 4096:
                raise ValueError(
                    f"--warmup-shapes: {name} {value} in {item!r} is not a multiple of {spatial_multiple} within 4096"
                )
        if frames % 4 != 1 or not 1 <= frames <= max_frames:
            raise ValueError(f"--warmup-shapes: {frames} frames in {item!r} is not 4k+1 within {max_frames}")
        shapes.append((width, height, frames))
    return tuple(dict.fromkeys(shapes))


def preset_warmup_shape(defaults: dict[str, Any]) -> WarmupShape | None:
    """The shape a request with only a prompt (and a landscape image) gets from the defaults."""
    size = defaults.get("size") or defaults.get("max_area")
    frames = defaults.get("num_frames")
    if not size or not frames:
        return None
    width, _, height = str(size).lower().partition("x")
    return int(width), int(height), int(frames)


LORA_EXPERTS = {"--lora": "all", "--lora-high": "high", "--lora-low": "low"}
"""Each LoRA flag and the experts it fuses into: every expert, or one of the two (high = the
high-noise `transformer`, low = the low-noise `transformer_2`)."""


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora/--lora-high/--lora-low PATH[:SCALE]`: a LoRA file fused into experts' weights at
    load (a launch-time choice, not a request field)."""

    path: Path
    scale: float = 1.0
    """The user's strength: W += scale * (alpha / rank) * B @ A."""
    experts: str = "all"
    """all, high or low (`LORA_EXPERTS`)."""
    sha256: str = ""
    """The first 12 hex digits of the file's SHA-256: what /v1/models and the logs name, with the
    file name, instead of its path."""

    @property
    def name(self) -> str:
        return self.path.name

    def card(self) -> dict[str, Any]:
        """What /v1/models says about it (no path)."""
        return {"name": self.name, "scale": self.scale, "experts": self.experts, "sha256": self.sha256}

    def describe(self) -> str:
        return f"{self.name} x{self.scale:g} ({self.experts}, sha256 {self.sha256})"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def parse_lora_spec(text: str, flag: str = "--lora") -> LoraSpec:
    """`PATH[:SCALE]` -> LoraSpec, checking that the file exists and the scale is a number, before
    torch loads. A path that itself holds a colon works when it exists as given."""
    path_text, scale = text, 1.0
    head, colon, tail = text.rpartition(":")
    if colon and not Path(text).expanduser().exists():
        try:
            scale = float(tail)
        except ValueError:
            raise ValueError(
                f"{flag} {text}: scale {tail!r} is not a number (PATH[:SCALE], e.g. lora.safetensors:0.8)"
            ) from None
        path_text = head
        if not math.isfinite(scale):
            raise ValueError(f"{flag} {text}: scale must be a finite number, got {tail!r}")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ValueError(f"{flag} {path_text}: no such file")
    if path.suffix != ".safetensors":
        raise ValueError(f"{flag} {path_text}: only .safetensors LoRA files are read (never pickles)")
    return LoraSpec(path=path, scale=scale, experts=LORA_EXPERTS[flag], sha256=_sha256(path))


def parse_lora_specs(info: ModelInfo, **by_flag: list[str] | None) -> tuple[LoraSpec, ...]:
    """Every LoRA flag's values (keyword = flag without dashes, e.g. lora_high=[...]), in flag order;
    --lora-high/--lora-low only where the family has two experts."""
    specs = []
    for flag in LORA_EXPERTS:
        for text in by_flag.get(flag.lstrip("-").replace("-", "_")) or ():
            if flag != "--lora" and info.family.experts < 2:
                raise ValueError(f"{flag}: {info.family.name} has one expert; use --lora")
            specs.append(parse_lora_spec(text, flag))
    return tuple(specs)


# ---------------------------------------------------------------------------------------------
# Step caching (--cache-backend, --cache-config): the names vllm-omni's server takes

# Each backend's --cache-config keys and their types; anything else is refused by name.
CACHE_CONFIG_KEYS: dict[str, dict[str, type]] = {
    "tea_cache": {"rel_l1_thresh": float, "ret_steps": int, "coefficients": list},
    "mag_cache": {"magcache_thresh": float, "magcache_K": int, "retention_ratio": float, "mag_ratios": list},
}


@dataclass(frozen=True)
class CacheSpec:
    """`--cache-backend` with its `--cache-config` (a launch-time choice; a request may only move the
    backend's threshold, `cache_threshold`)."""

    backend: str = "none"
    config: tuple[tuple[str, Any], ...] = ()
    """The --cache-config keys given, checked against CACHE_CONFIG_KEYS (lists as tuples: frozen)."""
    summary: bool = False
    """--enable-cache-dit-summary: log each request's skip summary at INFO."""

    @property
    def enabled(self) -> bool:
        return self.backend != "none"

    def options(self) -> dict[str, Any]:
        return dict(self.config)

    def describe(self) -> str:
        given = ", ".join(f"{k}={v if not isinstance(v, tuple) else f'<{len(v)} values>'}" for k, v in self.config)
        return self.backend + (f" ({given})" if given else "")


def _config_value(backend: str, key: str, kind: type, value: Any) -> Any:
    bad = f"--cache-config {key} must be "
    if kind is list:
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        ):
            raise ValueError(bad + f"a non-empty list of numbers, got {str(value)[:40]}")
        return tuple(float(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(bad + f"a number, got {str(value)[:40]}")
    if kind is int:
        if value != int(value) or value < 0:
            raise ValueError(bad + f"an integer >= 0, got {value}")
        return int(value)
    if key == "retention_ratio" and not 0 <= value <= 1:
        raise ValueError(bad + f"within [0, 1], got {value}")
    if key != "retention_ratio" and not value > 0:
        raise ValueError(bad + f"> 0, got {value}")
    return float(value)


def parse_cache_spec(backend: str, config: str | None, summary: bool = False) -> CacheSpec:
    """--cache-backend NAME --cache-config JSON -> CacheSpec, or ValueError naming what is wrong."""
    import json

    name = backend.strip().lower()
    if name not in CACHE_BACKENDS:
        raise ValueError(f"--cache-backend must be one of {', '.join(CACHE_BACKENDS)}, got {backend!r}")
    if name == "cache_dit":
        raise ValueError(CACHE_DIT_REFUSED)
    given: dict[str, Any] = {}
    if config is not None and config.strip():
        given = json.loads(cache_config_text(config))  # a JSON object, or the one-line error
    if given and name == "none":
        raise ValueError("--cache-config needs --cache-backend tea_cache or mag_cache")
    allowed = CACHE_CONFIG_KEYS.get(name, {})
    unknown = sorted(k for k in given if k not in allowed)
    if unknown:
        raise ValueError(f"--cache-config: {name} takes {', '.join(allowed)}; unknown: {', '.join(unknown)}")
    values = tuple((k, _config_value(name, k, allowed[k], v)) for k, v in given.items())
    return CacheSpec(backend=name, config=values, summary=summary)
