"""The one request schema shared by every front (CLI, HTTP, JSONL), validated once on rank 0.

Values arrive as strings (form fields, CLI flags) or JSON scalars; `resolve_params` turns them,
plus the layered defaults and the model's facts, into a frozen `GenerationParams` or raises
`RequestError` naming the field. No torch here: the HTTP layer uses this module too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wan_spmd import images
from wan_spmd.config import ModelInfo
from wan_spmd.images import Pixels
from wan_spmd.options import FLOAT_TEXT, INT_TEXT, MAX_NUMBER_CHARS, REQUEST_FIELDS, SCHEDULERS, Option, default

# The one field table is options.OPTIONS' request rows: the CLI options (cli.py) and the HTTP form
# model (server.wire.VideoForm) are made from it; values arrive as text or JSON scalars and are
# validated by `resolve_params` alone. The image is each front's own (`input_reference` upload over
# HTTP, an `image` path in the CLI and JSONL).
FIELDS: tuple[Option, ...] = REQUEST_FIELDS
PARAM_KEYS = tuple(f.name for f in FIELDS)
FRONT_KEYS = frozenset({"model", "image", "input_reference", "id", "output"})
MAX_SEED = 2**63 - 1
MAX_SHOWN_KEYS = 10  # unknown keys named in the warning; the rest are counted
MAX_SHOWN_KEY_CHARS = 40
# Every float field's largest value, checked as it is parsed, before any arithmetic (1e308 seconds
# would overflow x fps); the lower bounds are each field's own check, right after parsing.
FLOAT_MAX: dict[str, float] = {f.name: f.max for f in FIELDS if f.type is float and f.max is not None}


class RequestError(ValueError):
    """Bad input from a user; `field` names the request key at fault (None for the whole request)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Limits:
    """The validation limits every front shares (each has a flag; the defaults are the flags')."""

    max_width: int = default("max_width")
    """Widest frame in pixels."""
    max_height: int = default("max_height")
    """Tallest frame in pixels."""
    max_frames: int = default("max_frames")
    """Most frames per video."""
    max_steps: int = default("max_steps")
    """Most denoising steps (the least is 1)."""
    max_fps: int = default("max_fps")
    """Highest frame rate."""
    max_upload_bytes: int = default("max_upload_bytes")
    """Largest image upload (or image file)."""
    max_image_pixels: int = default("max_image_pixels")
    """Most pixels (width x height, read from the header before decoding) of an input image."""
    max_prompt_chars: int = default("max_prompt_chars")
    """Longest prompt or negative prompt; the text encoder keeps 512 tokens, roughly 2-4k characters."""
    max_work: int = default("max_work")
    """Most work per job, in token-steps as `Family.work` estimates it (steps x tokens x (1 + tokens /
    attention_tokens) + the VAE's share). 15M admits the presets' largest request, A14B
    1280x720x81 at 40 steps (75,600 tokens: 11.2M), and the same up to 54 steps."""
    deadline_s_at_max_work: float = default("job_deadline")
    """A job of `max_work` must finish within this many seconds; smaller jobs get a share (`deadline_s`)."""

    def deadline_s(self, work: int) -> float:
        """A job's deadline, counted from when the SPMD loop starts it: in proportion to its work,
        and never under a tenth of the full one (text encoding and decoding cost a floor)."""
        return self.deadline_s_at_max_work * max(work / self.max_work, 0.1)


@dataclass(frozen=True)
class GenerationParams:
    """A validated request with every default filled in; what the pipeline runs."""

    prompt: str
    negative_prompt: str
    image: Pixels | None
    """The input image decoded once on rank 0 (8-bit RGB), for I2V; None for T2V."""
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    """Classifier-free guidance of the high-noise expert; CFG runs at all only when > 1."""
    guidance_scale_2: float
    """Guidance of the low-noise expert."""
    boundary_ratio: float | None
    """None for a one-expert family."""
    flow_shift: float
    seed: int
    scheduler: str = "default"
    """One of SCHEDULERS: a generation setting (presets may set it), not a model fact."""
    warnings: tuple[str, ...] = ()
    """What was ignored or derived (unknown keys, rounded frame counts), reported back."""
    work: int = 0
    """The job's estimated time in token-steps (`Family.work`): what `Limits.max_work` bounds."""
    deadline_s: float | None = None
    """Seconds the job may run once started (Limits.deadline_s of its work); None: no deadline."""
    adjusted: tuple[tuple[str, str, str], ...] = ()
    """(field, requested, used) for each value rounded to what the model takes (lenient fronts only)."""
    cache_threshold: float | None = None
    """The step cache's threshold for this job; None: the backend's (--cache-config or its default)."""

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps

    def summary(self) -> dict[str, Any]:
        """The parameters as JSON-friendly values (no image bytes), for answers and logs."""
        out = asdict(self)
        out["image"] = None if self.image is None else f"<{self.image.width}x{self.image.height} image>"
        out["warnings"] = list(self.warnings)
        return out


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise RequestError(f"{name} must be an integer, got {value!r}", name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        # bounded before it is used or printed (a 5000-digit JSON integer cannot even be formatted)
        if abs(value) > MAX_SEED:
            raise RequestError(f"{name} {_shown(value)} is out of range", name)
        return value
    text = value.strip() if isinstance(value, str) else ""
    if len(text) > MAX_NUMBER_CHARS or not INT_TEXT.fullmatch(text):
        raise RequestError(f"{name} must be an integer (ASCII digits), got {_shown(value)}", name)
    return int(text)


def _as_float(name: str, value: Any) -> float:
    """A finite number, at most FLOAT_MAX[name] (checked here, before the caller computes with it)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RequestError(f"{name} must be a number, got {_shown(value)}", name)
    if isinstance(value, str):
        text = value.strip()
        if text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise RequestError(f"{name} must be a finite number, got {_shown(value)}", name)
        if len(text) > MAX_NUMBER_CHARS or not FLOAT_TEXT.fullmatch(text):
            raise RequestError(f"{name} must be a number (ASCII digits), got {_shown(value)}", name)
        value = text
    try:
        number = float(value)
    except (OverflowError, ValueError):  # a 401-digit JSON integer does not fit a float
        number = math.inf
    if not math.isfinite(number):
        raise RequestError(f"{name} must be a finite number, got {_shown(value)}", name)
    if number > FLOAT_MAX.get(name, math.inf):
        raise RequestError(f"{name} must be at most {FLOAT_MAX[name]:g}, got {_shown(value)}", name)
    return number


def _shown(value: Any, limit: int = MAX_SHOWN_KEY_CHARS) -> str:
    """A client's value for an error or warning: repr'd (so a lone surrogate is escaped, not
    unencodable), cut short, never megabytes."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit else f"<{value.bit_length()}-bit int>"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown_key(key: str) -> str:
    """An unknown key as written (escaped only where it cannot be encoded), cut short."""
    text = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_SHOWN_KEY_CHARS else text[: MAX_SHOWN_KEY_CHARS - 3] + "..."


def parse_size(value: Any, name: str = "size") -> tuple[int, int]:
    """'1280x720' -> (1280, 720); ASCII digits only."""
    text = value.strip().lower() if isinstance(value, str) else ""
    parts = text.split("x")
    if (
        len(text) > MAX_NUMBER_CHARS
        or len(parts) != 2
        or not all(INT_TEXT.fullmatch(p.strip()) and p.strip()[0] != "+" and p.strip()[0] != "-" for p in parts)
    ):
        raise RequestError(f"{name} must look like WIDTHxHEIGHT (e.g. 1280x720), got {_shown(value)}", name)
    return int(parts[0]), int(parts[1])


def decode_image(data: bytes, name: str = "image", max_pixels: int = Limits.max_image_pixels) -> Pixels:
    """Decode an input image once (images.decode: PNG/JPEG/WebP, pixels checked before decoding)."""
    try:
        return images.decode(data, max_pixels)
    except images.ImageError as exc:
        raise RequestError(f"{name} {exc}", name) from None


def read_image_file(path: str | Path, field: str = "image", max_bytes: int = Limits.max_upload_bytes) -> bytes:
    """An image path from the CLI or a JSONL line, as bytes: a regular file, size-checked first."""
    try:
        return images.read_file(path, max_bytes)
    except images.ImageError as exc:
        raise RequestError(f"cannot read {field} {_shown(str(path), 120)}: {exc}", field) from None


@dataclass(frozen=True)
class ModelLimits:
    """The largest frame and frame count one model can take under the flags' limits."""

    max_width: int
    max_height: int
    max_frames: int
    multiple: int
    """Width and height are multiples of this."""


def model_limits(info: ModelInfo, limits: Limits = Limits()) -> ModelLimits:
    """The flags' limits, lowered to what the model's rotary table covers: diffusers' Wan transformer
    precomputes `rope_max_seq_len` positions per axis (latent frames, rows, columns after the patch),
    so a larger grid fails inside the first forward (the tiny model's 32 positions: 512 px, 125 frames)."""
    positions = int(info.transformer_config.get("rope_max_seq_len", 1024))
    multiple = info.spatial_multiple
    frames = (positions - 1) * info.family.vae_stride_temporal + 1
    return ModelLimits(
        max_width=min(limits.max_width, positions * multiple),
        max_height=min(limits.max_height, positions * multiple),
        max_frames=min(limits.max_frames, frames),
        multiple=multiple,
    )


def _over_limit(value: int, limit: int, flag_limit: int, flag: str) -> str:
    """Which limit a value ran into, for the error: the flag's, or the model's own (its rotary table)."""
    if value > flag_limit:
        return f"over the limit {flag_limit} ({flag})"
    return f"over this model's limit {limit} (its rotary position table is that short)"


def token_count(info: ModelInfo, width: int, height: int, num_frames: int) -> int:
    """Transformer tokens of one video: latent frames x latent rows x latent columns, after the patch."""
    family = info.family
    latent_frames = (num_frames - 1) // family.vae_stride_temporal + 1
    return latent_frames * (height // family.spatial_multiple) * (width // family.spatial_multiple)


def size_from_area(image_width: int, image_height: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """Official Wan2.2 I2V sizing: keep the image's aspect ratio within `max_area` pixels, each side
    rounded down to a multiple of 16 (VAE stride 8 x patch 2)."""
    aspect = image_height / image_width
    height = int(math.sqrt(max_area * aspect) // multiple * multiple)
    width = int(math.sqrt(max_area / aspect) // multiple * multiple)
    return max(width, multiple), max(height, multiple)


def best_fit_size(image_width: int, image_height: int, max_area: int, multiple: int = 32) -> tuple[int, int]:
    """Official Wan2.2 TI2V sizing (`best_output_size` in wan/utils/utils.py): round the width down to
    the multiple and fit the height in the area, or the other way round; keep the pair whose aspect
    ratio is closer to the image's."""
    ratio = image_width / image_height
    width = math.sqrt(max_area * ratio)
    height = max_area / width
    w1 = max(int(width // multiple * multiple), multiple)
    h1 = max(int(max_area / w1 // multiple * multiple), multiple)
    h2 = max(int(height // multiple * multiple), multiple)
    w2 = max(int(max_area / h2 // multiple * multiple), multiple)

    def off(w: int, h: int) -> float:
        return max(ratio / (w / h), (w / h) / ratio)

    return (w1, h1) if off(w1, h1) < off(w2, h2) else (w2, h2)


def derive_num_frames(seconds: float, fps: int) -> int:
    """Frames from a duration, rounded as diffusers rounds (`n // 4 * 4 + 1`): 5 s x 16 fps -> 81."""
    return int(seconds * fps) // 4 * 4 + 1


def resolve_params(
    request: Mapping[str, Any],
    *,
    info: ModelInfo,
    defaults: Mapping[str, Any],
    limits: Limits = Limits(),
    image: bytes | None = None,
    image_field: str = "input_reference",
    round_to_model: bool = False,
) -> GenerationParams:
    """Validate one request against the limits and the model, filling in defaults.

    Explicit values the model cannot take are errors; derived values (frames from seconds x fps,
    I2V size from the image) are rounded and reported in `warnings`. `image_field` is what the
    front calls the image in its errors (`input_reference` over HTTP, `image` in the CLI and JSONL).
    `round_to_model` (the HTTP front, unless strict): an explicit size or frame count the model cannot
    take is rounded as diffusers rounds (each side down to the model's multiple; frames to
    `n // 4 * 4 + 1`), reported in `warnings` and `adjusted`, instead of refused.
    """
    warnings: list[str] = []
    adjusted: list[tuple[str, str, str]] = []
    bounds = model_limits(info, limits)
    unknown = [k for k in request if k not in PARAM_KEYS and k not in FRONT_KEYS]
    if unknown:
        # bounded: a body may carry a million keys, and the warning goes into the answer and the log
        shown = ", ".join(_shown_key(k) for k in unknown[:MAX_SHOWN_KEYS])
        more = f" and {len(unknown) - MAX_SHOWN_KEYS} more" if len(unknown) > MAX_SHOWN_KEYS else ""
        warnings.append(f"ignored unknown keys: {shown}{more}")
    req = {k: v for k, v in request.items() if k in PARAM_KEYS and not _is_blank(v)}

    def pick(name: str) -> Any:
        return req[name] if name in req else defaults.get(name)

    # 1. Prompts
    prompt = request.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt is required and must be a non-empty string", "prompt")
    negative_prompt = pick("negative_prompt") or ""
    if not isinstance(negative_prompt, str):
        raise RequestError("negative_prompt must be a string", "negative_prompt")
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise RequestError(
                f"{name} is {len(text)} characters, over the limit {limits.max_prompt_chars} (--max-prompt-chars)", name
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, from a JSON "\ud800" escape
            raise RequestError(f"{name} is not valid Unicode ({exc.reason} at character {exc.start})", name) from None

    # 2. Image: required, optional or refused, as the model's family says
    pixels = None
    policy = info.family.image
    if image is None and policy == "required":
        raise RequestError(f"this is an image-to-video model: send an input image ({image_field})", image_field)
    if image is not None and policy == "refused":
        raise RequestError(f"this is a text-to-video model: it takes no input image ({image_field})", image_field)
    if image is not None:
        if len(image) > limits.max_upload_bytes:
            raise RequestError(
                f"{image_field} is {len(image)} bytes, over the {limits.max_upload_bytes}-byte limit", image_field
            )
        pixels = decode_image(image, image_field, limits.max_image_pixels)

    # 3. Size: size wins over width/height; else the image's aspect (I2V) or the default size
    multiple = info.spatial_multiple
    if "size" in req:
        width, height = parse_size(req["size"])
        size_field = "size"
    elif "width" in req or "height" in req:
        if "width" not in req or "height" not in req:
            missing = "height" if "width" in req else "width"
            raise RequestError(f"give both width and height (or size), {missing} is missing", missing)
        width, height = _as_int("width", req["width"]), _as_int("height", req["height"])
        size_field = "width"
    elif pixels is not None and defaults.get("max_area"):
        area_w, area_h = parse_size(defaults["max_area"], "max_area")
        from_image = best_fit_size if info.family.image_sizing == "best_fit" else size_from_area
        width, height = from_image(pixels.width, pixels.height, area_w * area_h, multiple)
        size_field = "size"
        warnings.append(f"size {width}x{height} follows the image's aspect ratio within {area_w}x{area_h}")
    elif defaults.get("size"):
        width, height = parse_size(defaults["size"])
        size_field = "size"
    else:
        raise RequestError("size is required (e.g. 1280x720)", "size")
    if round_to_model and (width % multiple or height % multiple) and width >= multiple and height >= multiple:
        used = (width // multiple * multiple, height // multiple * multiple)
        adjusted.append((size_field if size_field == "size" else "width", f"{width}x{height}", f"{used[0]}x{used[1]}"))
        warnings.append(f"size {width}x{height} rounded down to {used[0]}x{used[1]} (multiples of {multiple})")
        width, height = used
    for value, dim, limit, flag_limit in (
        (width, "width", bounds.max_width, limits.max_width),
        (height, "height", bounds.max_height, limits.max_height),
    ):
        if value < multiple or value % multiple:
            raise RequestError(f"{dim} {value} must be a positive multiple of {multiple}", size_field)
        if value > limit:
            raise RequestError(f"{dim} {value} is {_over_limit(value, limit, flag_limit, '--max-' + dim)}", size_field)

    # 4. Frames: num_frames wins over seconds x fps
    fps = _as_int("fps", pick("fps") if pick("fps") is not None else 16)
    if not 1 <= fps <= limits.max_fps:
        raise RequestError(f"fps {fps} must be between 1 and {limits.max_fps}", "fps")
    if "num_frames" in req or "seconds" not in req:
        num_frames = _as_int("num_frames", pick("num_frames"))
        if round_to_model and num_frames >= 1 and num_frames % 4 != 1:
            used_frames = derive_num_frames(num_frames, 1)
            adjusted.append(("num_frames", str(num_frames), str(used_frames)))
            warnings.append(f"num_frames {num_frames} rounded to {used_frames} (4k+1, as diffusers rounds)")
            num_frames = used_frames
        if num_frames < 1 or num_frames % 4 != 1:
            raise RequestError(f"num_frames {num_frames} must be 4k+1 (e.g. 81, 121)", "num_frames")
        frames_field = "num_frames"
    else:
        seconds = _as_float("seconds", req["seconds"])
        if seconds <= 0:
            raise RequestError(f"seconds must be positive, got {seconds:g}", "seconds")
        num_frames = derive_num_frames(seconds, fps)
        frames_field = "seconds"
        warnings.append(f"num_frames {num_frames} from {seconds:g} s x {fps} fps (rounded to 4k+1)")
    if num_frames > bounds.max_frames:
        where = _over_limit(num_frames, bounds.max_frames, limits.max_frames, "--max-frames")
        raise RequestError(f"num_frames {num_frames} is {where}", frames_field)

    # 5. Sampling
    steps = _as_int("num_inference_steps", pick("num_inference_steps"))
    if not 1 <= steps <= limits.max_steps:
        raise RequestError(
            f"num_inference_steps {steps} must be between 1 and {limits.max_steps}", "num_inference_steps"
        )
    guidance = _as_float("guidance_scale", pick("guidance_scale"))
    guidance_2 = _as_float(
        "guidance_scale_2", pick("guidance_scale_2") if pick("guidance_scale_2") is not None else guidance
    )
    for name, value in (("guidance_scale", guidance), ("guidance_scale_2", guidance_2)):
        if value < 0:
            raise RequestError(f"{name} must be >= 0, got {value:g}", name)
    boundary = None
    if info.family.experts == 2:
        boundary = _as_float("boundary_ratio", req.get("boundary_ratio", info.boundary_ratio))
        if not 0.0 <= boundary <= 1.0:
            raise RequestError(f"boundary_ratio must be within [0, 1], got {boundary:g}", "boundary_ratio")
    elif "boundary_ratio" in req:
        warnings.append("ignored boundary_ratio: this model has one expert")
    flow_shift = _as_float("flow_shift", pick("flow_shift"))
    if flow_shift <= 0:
        raise RequestError(f"flow_shift must be > 0, got {flow_shift:g}", "flow_shift")
    tokens = token_count(info, width, height, num_frames)
    work = info.family.work(info.transformer_config, tokens, steps)
    if work > limits.max_work:
        raise RequestError(
            f"{width}x{height}x{num_frames} frames at {steps} steps is {work} token-steps "
            f"({tokens} tokens, {steps} steps, attention and decoding counted), over the limit "
            f"{limits.max_work} (--max-work)",
            "num_inference_steps",
        )
    scheduler_value = pick("scheduler") or "default"
    scheduler = scheduler_value.strip().lower() if isinstance(scheduler_value, str) else ""
    if scheduler not in SCHEDULERS:
        raise RequestError(
            f"scheduler must be one of {', '.join(SCHEDULERS)}, got {_shown(scheduler_value)}", "scheduler"
        )
    cache_threshold = None
    if pick("cache_threshold") is not None:
        cache_threshold = _as_float("cache_threshold", pick("cache_threshold"))
        if not cache_threshold > 0:
            raise RequestError(f"cache_threshold must be > 0, got {cache_threshold:g}", "cache_threshold")
    seed_value = pick("seed")
    seed = random.randrange(2**32) if seed_value is None else _as_int("seed", seed_value)
    if not 0 <= seed <= MAX_SEED:
        raise RequestError(f"seed must be between 0 and {MAX_SEED}, got {seed}", "seed")

    return GenerationParams(
        prompt=prompt,
        negative_prompt=negative_prompt,
        image=pixels,
        width=width,
        height=height,
        num_frames=num_frames,
        fps=fps,
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_scale_2=guidance_2,
        boundary_ratio=boundary,
        flow_shift=flow_shift,
        seed=seed,
        scheduler=scheduler,
        warnings=tuple(warnings),
        adjusted=tuple(adjusted),
        work=work,
        deadline_s=limits.deadline_s(work),
        cache_threshold=cache_threshold,
    )
