"""LoRA files fused into the experts' weights at load, each rank computing the delta of its own
slices only.

    W[slice] += scale * (alpha / rank) * B[rows] @ A[:, cols]      in fp32, cast once

Column-parallel weights take B's rows of the slice, row-parallel ones A's columns; biases, norms
and modulation tables take their full-shape deltas (`.diff_b`, `.diff`, `.diff_m`) sliced the same
way. The loader (`loading`) asks `ExpertDeltas.add_to` for each parameter as it reads it, so no rank
ever holds a whole expert, fused or not.

Formats, and what happens to every key:
- diffusers / PEFT (`blocks.N.attn1.to_q.lora_A.weight`, `lora_B.weight`, `lora_B.bias`, with an
  optional `transformer.` prefix and alpha/rank in the file's `lora_adapter_metadata`).
- original Wan / ComfyUI / lightx2v (`diffusion_model.blocks.N.self_attn.q.lora_down.weight`,
  `lora_up`, `.alpha`): the blocks' low-rank pairs go through diffusers' own converter
  (`compat.convert_wan_lora`), and every pair that went in must come out under
  the name we expect. The few pairs outside the blocks (head.head, time_projection, the text and
  time embeddings) are ours: that converter refuses their `.alpha` keys. Full-shape deltas are
  ours to apply too, since diffusers 0.42 drops norm `.diff` and `.diff_b` keys (with a debug
  line) and every other `.diff`/`.diff_m` (with an info line): `.diff` -> weight, `.diff_b` ->
  bias, `.diff_m` -> the block's (or head's) modulation table.
- keys of Wan2.1 I2V's image branch (`k_img`, `v_img`, `norm_k_img`, `img_emb.*`, and their
  diffusers names), which Wan2.2 does not have: skipped and counted.
- anything else, a module the model lacks (a LoRA for more blocks), or a shape that does not fit (a
  LoRA for another model size): `LoraError`, one line naming the key or module and both shapes.

`check_loras` runs all of that on meta tensors (shapes from the safetensors header, alphas read) so
the CLI can refuse a bad file before any rank loads; `read_deltas` runs the same code on the real
tensors when the experts load.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from wan_spmd.launch import LoraSpec

log = logging.getLogger("wan_spmd")


class LoraError(ValueError):
    """A LoRA file that cannot be fused exactly (one line, names the file and what is wrong)."""


# Wan's own module names -> diffusers' (as diffusers' scripts/convert_wan_to_diffusers.py renames
# them), for the full-shape deltas we apply ourselves and to name the converter's outputs.
_BLOCK_MODULES = {
    **{f"self_attn.{o}": f"attn1.{d}" for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    **{f"cross_attn.{o}": f"attn2.{d}" for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # Wan's norm3 (before cross-attention) is diffusers' norm2
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
# Wan2.1 I2V's image branch, in Wan's names and diffusers': Wan2.2 has none of it.
_IMAGE_BRANCH = re.compile(
    r"(^|\.)(k_img|v_img|norm_k_img|img_emb|add_k_proj|add_v_proj|norm_added_k|image_embedder)(\.|$)"
)
_WAN_KEY = re.compile(
    r"(?P<module>.+)\.(?P<kind>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)"
)
_DIFF_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>diff|diff_b|diff_m)")
_PEFT_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias)")


def wan_to_diffusers(module: str) -> str | None:
    """`blocks.3.self_attn.q` -> `blocks.3.attn1.to_q`; None for a name Wan2.2 does not have."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m:
        part = _BLOCK_MODULES.get(m[2])
        return f"blocks.{m[1]}.{part}" if part else None
    return _TOP_MODULES.get(module)


@dataclass
class LowRank:
    """One module's pair: the weight's delta is factor * up @ down."""

    down: torch.Tensor
    """A, (rank, in_features); alpha/rank already folded in where diffusers' converter did it."""
    up: torch.Tensor
    """B, (out_features, rank)."""
    factor: float


@dataclass
class ExpertDeltas:
    """Every LoRA delta for one expert, by parameter name; asked per slice as the loader reads."""

    low_rank: dict[str, list[LowRank]] = field(default_factory=dict)
    full: dict[str, list[tuple[torch.Tensor, float]]] = field(default_factory=dict)
    """Full-shape deltas (`.diff`, `.diff_b`, `.diff_m`, `lora_B.bias`) with their factors."""

    def __contains__(self, name: str) -> bool:
        return name in self.low_rank or name in self.full

    def __bool__(self) -> bool:
        return bool(self.low_rank or self.full)

    def add_to(self, name: str, local: torch.Tensor, index: tuple[slice, ...]) -> None:
        """local (fp32, this rank's slice `index` of parameter `name`) += every delta of that slice."""
        device = local.device
        for pair in self.low_rank.get(name, ()):
            # (out_slice, r) @ (r, in_slice): only this rank's rows of B and columns of A
            up = pair.up[index[0]].to(device=device, dtype=torch.float32)
            down = pair.down[:, index[1]].to(device=device, dtype=torch.float32)
            local.addmm_(up, down, alpha=pair.factor)  # no (out, in) temporary beside the slice
        for delta, factor in self.full.get(name, ()):
            local.add_(delta[index].to(device=device, dtype=torch.float32), alpha=factor)


@dataclass
class LoraReport:
    """What one file brought: counted, for the logs and the tests."""

    spec: LoraSpec
    pairs: int = 0
    full: int = 0
    skipped_image_keys: int = 0


class _Source:
    """A LoRA file's tensors: real ones, or meta tensors of the header's shapes (alphas always real,
    they are scalars the converter reads)."""

    def __init__(self, spec: LoraSpec, meta: bool) -> None:
        from safetensors import safe_open

        self.spec = spec
        self.meta = meta
        try:
            self.file = safe_open(spec.path, framework="pt", device="cpu")
        except Exception as exc:  # a truncated or foreign file: safetensors' own words
            raise LoraError(f"LoRA {spec.name}: not a readable safetensors file ({exc})") from None
        self.keys = list(self.file.keys())
        self.metadata = self.file.metadata() or {}

    def get(self, key: str) -> torch.Tensor:
        if self.meta and not key.endswith(".alpha"):
            return torch.empty(self.file.get_slice(key).get_shape(), device="meta")
        return self.file.get_tensor(key)


def _error(spec: LoraSpec, message: str) -> LoraError:
    return LoraError(f"LoRA {spec.name}: {message}")


def _name_keys(keys: list[str], prefix: str = "") -> str:
    shown = ", ".join(repr(prefix + k) for k in keys[:3])
    return shown + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")


def _read_file(spec: LoraSpec, shapes: dict[str, torch.Size], meta: bool) -> tuple[ExpertDeltas, LoraReport]:
    """One file's deltas (before the user's scale is known per expert: factors include it)."""
    source = _Source(spec, meta)
    report = LoraReport(spec)
    deltas = ExpertDeltas()
    if any(k.startswith("lora_unet_") for k in source.keys):
        raise _error(spec, "kohya/musubi keys (lora_unet_*) are not supported; convert to diffusers' format first")
    if any(k.startswith("diffusion_model.") for k in source.keys):
        _read_wan(source, shapes, deltas, report)
    else:
        _read_peft(source, shapes, deltas, report)
    return deltas, report


def _check_full(spec: LoraSpec, key: str, param: str, shape: torch.Size, shapes: dict[str, torch.Size]) -> None:
    if param not in shapes:
        raise _error(spec, f"key {key!r} is for {param}, which this model does not have (a LoRA for another model?)")
    if tuple(shape) != tuple(shapes[param]):
        raise _error(spec, f"{param}: the LoRA's delta is {tuple(shape)} but the model's is {tuple(shapes[param])}")


def _checked(spec: LoraSpec, key: str, tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """An alpha must be one finite number and a down (A) weight of rank at least 1: a NaN or an
    infinity would poison every fused weight, rank 0 divide by zero."""
    if kind == "alpha":
        value = float(tensor.float().reshape(-1)[0]) if tensor.numel() == 1 else math.nan
        if not math.isfinite(value):
            shown = f"{value:g}" if tensor.numel() == 1 else f"a tensor of shape {tuple(tensor.shape)}"
            raise _error(spec, f"{key} must be one finite number, got {shown}")
    elif kind in ("lora_down.weight", "lora_A.weight") and (tensor.ndim == 0 or tensor.shape[0] == 0):
        raise _error(spec, f"{key} has rank 0 (shape {tuple(tensor.shape)}); a LoRA pair needs rank >= 1")
    return tensor


def _add_pair(
    spec: LoraSpec, module: str, down: torch.Tensor, up: torch.Tensor, factor: float, shapes, deltas: ExpertDeltas
) -> None:
    param = f"{module}.weight"
    if param not in shapes:
        raise _error(spec, f"{module} is not a module of this model (a LoRA for another model?)")
    want = tuple(shapes[param])
    made = (up.shape[0], down.shape[1]) if down.ndim == 2 and up.ndim == 2 else (tuple(up.shape), tuple(down.shape))
    if len(want) != 2 or made != want or up.shape[1] != down.shape[0]:
        raise _error(
            spec,
            f"{module}: the LoRA makes {made} (lora_B {tuple(up.shape)} @ lora_A {tuple(down.shape)}) "
            f"but the model's weight is {want}",
        )
    deltas.low_rank.setdefault(param, []).append(LowRank(down, up, factor))


def _read_wan(source: _Source, shapes, deltas: ExpertDeltas, report: LoraReport) -> None:
    """Original Wan / ComfyUI / lightx2v keys: pairs through diffusers' converter, diffs ourselves."""
    from wan_spmd.compat import convert_wan_lora

    spec = source.spec
    strays = [k for k in source.keys if not k.startswith("diffusion_model.")]
    if strays:
        raise _error(spec, f"keys without the diffusion_model. prefix the rest has: {_name_keys(strays)}")
    to_convert: dict[str, torch.Tensor] = {}
    outside: dict[str, dict[str, torch.Tensor]] = {}
    expected: set[str] = set()
    unknown: list[str] = []
    for key in source.keys:
        name = key.removeprefix("diffusion_model.")
        if _IMAGE_BRANCH.search(name):
            report.skipped_image_keys += 1
            continue
        if m := _DIFF_KEY.fullmatch(name):
            module, kind = m["module"], m["kind"]
            if kind == "diff_m":  # Wan's `modulation` parameter, per block and in the head
                param = "scale_shift_table" if module == "head" else f"{module}.scale_shift_table"
                if not re.fullmatch(r"head|blocks\.\d+", module):
                    unknown.append(key)
                    continue
            else:
                target = wan_to_diffusers(module)
                if target is None:
                    unknown.append(key)
                    continue
                param = f"{target}.{'bias' if kind == 'diff_b' else 'weight'}"
            tensor = source.get(key)
            _check_full(spec, key, param, tensor.shape, shapes)
            deltas.full.setdefault(param, []).append((tensor, spec.scale))
            report.full += 1
            continue
        m = _WAN_KEY.fullmatch(name)
        target = wan_to_diffusers(m["module"]) if m else None
        if target is None or "norm" in target or target == "patch_embedding":
            unknown.append(key)
            continue
        if not name.startswith("blocks."):
            # diffusers' converter refuses an alpha outside the blocks (head.head, time_projection):
            # these few pairs are ours, with the same rule W += scale * alpha / rank * up @ down
            outside.setdefault(target, {})[m["kind"].split(".")[0]] = _checked(spec, key, source.get(key), m["kind"])
            continue
        to_convert[key] = _checked(spec, key, source.get(key), m["kind"])
        if m["kind"] != "alpha":
            side = "A" if m["kind"] in ("lora_down.weight", "lora_A.weight") else "B"
            expected.add(f"transformer.{target}.lora_{side}.weight")
    if unknown:
        raise _error(spec, f"keys that match no module of a Wan2.2 expert: {_name_keys(unknown)}")
    for module, parts in outside.items():
        down, up = parts.get("lora_down", parts.get("lora_A")), parts.get("lora_up", parts.get("lora_B"))
        if down is None or up is None:
            raise _error(spec, f"{module} has {' and '.join(sorted(parts))} but not both halves of a pair")
        alpha = float(parts["alpha"]) if "alpha" in parts else down.shape[0]
        _add_pair(spec, module, down, up, spec.scale * alpha / down.shape[0], shapes, deltas)
        report.pairs += 1
    if not to_convert:
        return
    try:
        converted = convert_wan_lora(dict(to_convert))
    except Exception as exc:  # a half pair, an alpha without its weights: diffusers' own words
        raise _error(spec, f"diffusers' converter refused it: {type(exc).__name__}: {exc}") from None
    # Every pair that went in must come out under the name we expect, and nothing else.
    missing, extra = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or extra:
        raise _error(spec, f"key conversion lost {_name_keys(missing)} and made {_name_keys(extra)}")
    _add_pairs(spec, {k.removeprefix("transformer."): v for k, v in converted.items()}, spec.scale, shapes, deltas)
    report.pairs += len(expected) // 2


def _add_pairs(spec: LoraSpec, tensors: dict[str, torch.Tensor], factor, shapes, deltas: ExpertDeltas) -> None:
    """`module.lora_A.weight` / `lora_B.weight` pairs in diffusers' names -> low-rank deltas."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if k.endswith(".weight")})
    for module in modules:
        down, up = tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight")
        if down is None or up is None:
            have, lack = ("B", "A") if down is None else ("A", "B")
            raise _error(spec, f"{module} has lora_{have} without lora_{lack}")
        _add_pair(spec, module, down, up, factor(module) if callable(factor) else factor, shapes, deltas)


def _peft_factor(spec: LoraSpec, metadata: dict[str, str]):
    """alpha / rank from diffusers' `lora_adapter_metadata` (what `load_lora_weights` builds its
    LoraConfig from); without it diffusers takes alpha = rank (factor 1)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return lambda module: spec.scale
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise _error(spec, f"its lora_adapter_metadata is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _error(spec, f"its lora_adapter_metadata must be a JSON object, got {type(config).__name__}")
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise _error(spec, f"per-module {key} in its metadata is not supported")
    if config.get("use_dora") or config.get("use_rslora"):
        raise _error(spec, "DoRA / rsLoRA adapters are not supported (they do not fuse as W += B @ A)")
    rank, alpha = config.get("r", 1), config.get("lora_alpha", config.get("r", 1))
    if not _is_number(rank) or not rank >= 1:
        raise _error(spec, f"its metadata's rank r must be a number >= 1, got {str(rank)[:40]!r}")
    if not _is_number(alpha) or not math.isfinite(alpha):
        raise _error(spec, f"its metadata's lora_alpha must be a finite number, got {str(alpha)[:40]!r}")
    ratio = float(alpha) / float(rank)
    return lambda module: spec.scale * ratio


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_peft(source: _Source, shapes, deltas: ExpertDeltas, report: LoraReport) -> None:
    """diffusers / PEFT keys: already diffusers' names."""
    spec = source.spec
    factor = _peft_factor(spec, source.metadata)
    pairs: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key in source.keys:
        name = key.removeprefix("transformer.").removeprefix("base_model.model.")
        if _IMAGE_BRANCH.search(name):
            report.skipped_image_keys += 1
            continue
        m = _PEFT_KEY.fullmatch(name)
        if m is None:
            unknown.append(key)
        elif m["kind"] == "lora_B.bias":
            param = f"{m['module']}.bias"
            tensor = source.get(key)
            _check_full(spec, key, param, tensor.shape, shapes)
            deltas.full.setdefault(param, []).append((tensor, factor(m["module"])))
            report.full += 1
        else:
            pairs[name] = source.get(key)
    if unknown:
        raise _error(spec, f"keys that match no module of a Wan2.2 expert: {_name_keys(unknown)}")
    _add_pairs(spec, pairs, factor, shapes, deltas)
    report.pairs += len(pairs) // 2


def param_shapes(transformer_config: dict) -> dict[str, torch.Size]:
    """Every parameter's full (unsharded) shape, from the architecture on the meta device."""
    from wan_spmd.loading import expert_on_meta

    return {name: p.shape for name, p in expert_on_meta(transformer_config).named_parameters()}


def _merge(into: ExpertDeltas, other: ExpertDeltas) -> None:
    for name, pairs in other.low_rank.items():
        into.low_rank.setdefault(name, []).extend(pairs)
    for name, fulls in other.full.items():
        into.full.setdefault(name, []).extend(fulls)


def read_deltas(
    specs: Iterable[LoraSpec], expert_names: tuple[str, ...], transformer_config: dict, meta: bool = False
) -> tuple[dict[str, ExpertDeltas], list[LoraReport]]:
    """Each expert's deltas (`transformer` = high, `transformer_2` = low) from every spec aimed at
    it; each file is read once. meta=True checks everything without reading the weights."""
    shapes = param_shapes(transformer_config)
    by_expert = {name: ExpertDeltas() for name in expert_names}
    reports = []
    for spec in specs:
        deltas, report = _read_file(spec, shapes, meta)
        reports.append(report)
        targets = {"all": expert_names, "high": expert_names[:1], "low": expert_names[1:2]}[spec.experts]
        for name in targets:
            _merge(by_expert[name], deltas)
    return by_expert, reports


def check_loras(
    specs: tuple[LoraSpec, ...], transformer_config: dict, expert_names: tuple[str, ...], warn: bool = True
) -> list[LoraReport]:
    """Every key of every file accounted for and every shape checked against the architecture, on
    meta tensors (no weights read): the CLI's check before any rank loads. With `warn` (rank 0),
    one warning per file that had image-branch keys skipped."""
    _, reports = read_deltas(specs, expert_names, transformer_config, meta=True)
    for report in reports:
        if warn and report.skipped_image_keys:
            log.warning(
                "LoRA %s: skipped %d key(s) of Wan2.1 I2V's image branch (k_img, v_img, norm_k_img, img_emb), "
                "which Wan2.2 does not have",
                report.spec.name,
                report.skipped_image_keys,
            )
    return reports
