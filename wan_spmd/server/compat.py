"""What clients of other video APIs send (OpenAI's SDK, vllm-omni's clients), mapped onto our one
schema or refused by name, before `params.resolve_params` sees the request. No torch.

Three kinds of foreign field:
- mapped: the same meaning under another name or shape (`true_cfg_scale`, vllm-omni's
  `video_params` block, `image_reference` / `input_reference` as `{"image_url": "data:..."}`, form
  fields written with brackets as the OpenAI SDK writes nested objects: `input_reference[image_url]`);
- refused: a field that would change the video and that we cannot honour (`lora`, `n` > 1,
  `generate_sound` true, ...): a 400 naming it, never a video the client did not ask for;
- inert: anything else unknown changes nothing (client metadata such as `user`): `resolve_params`
  names it in the warnings.
"""

from __future__ import annotations

import json
from typing import Any

from wan_spmd.params import Limits
from wan_spmd.server.body import IMAGE_FIELD, decode_base64_image
from wan_spmd.server.errors import ApiError

REFERENCE_FIELD = "image_reference"
"""OpenAI's JSON-safe image reference (and vllm-omni's form field of the same name)."""

REFUSED: dict[str, str] = {
    "video_reference": "this server makes videos from a prompt and an image only, not from another video",
    "reference_url": "images are sent as bytes (input_reference upload, base64 or a data URL); URLs are never fetched",
    "audio_reference": "Wan2.2 takes no audio",
    "lora": "LoRAs are fused when the server starts (--lora; GET /v1/models lists them); "
    "a LoRA per request is not supported",
    "extra_params": "model-specific extra parameters are not supported; send the documented fields at the top level "
    "(scheduler, flow_shift, ...)",
    "extra_body": "send these fields at the top level of the body (the OpenAI SDK's extra_body= does that itself)",
    "aspect_ratio": "send size as WIDTHxHEIGHT",
    "short_edge": "send size as WIDTHxHEIGHT",
    "start_time_seconds": "videos always start at frame 0 here",
    "remix_video_id": "remixing another video is not served here",
    "remixed_from_video_id": "remixing another video is not served here",
}
"""Fields that change the video and that this server cannot honour, with why."""

SWITCHES: dict[str, str] = {
    "generate_sound": "Wan2.2 makes no audio",
    "enable_frame_interpolation": "frame interpolation is not offered; ask for more frames (num_frames, fps)",
    "stream": "answers are not streamed; create the job, then poll GET /v1/videos/{id}",
}
"""Flags that are fine when false and refused when true."""

COUNTS = ("n", "num_outputs_per_prompt")
"""Videos per request: 1 is fine, more is refused (one video per job)."""

QUALITIES = ("default", "auto", "standard")
"""`quality` values that mean "what the model does"; no other quality is offered."""

VIDEO_PARAMS = "video_params"
VIDEO_PARAM_KEYS = ("width", "height", "num_frames", "fps")
"""vllm-omni's optional block of video fields; top-level fields win, as there."""

ALIASES = {"true_cfg_scale": "guidance_scale"}
"""vllm-omni names whose meaning is one of our fields: Wan's CFG is a true CFG (a negative-prompt
branch), which is what `true_cfg_scale` names in vllm-omni's other pipelines."""

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off", "")


def parse_bool(name: str, value: Any) -> bool:
    """A JSON boolean or a form's text ("true", "false", "1", "0", ...)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ApiError(400, f"{name} must be true or false, got {str(value)[:40]!r}", name)


def fold_brackets(fields: dict[str, Any]) -> dict[str, Any]:
    """Form fields named `outer[inner]` (how the OpenAI SDK writes a nested object into a
    multipart form) as `{outer: {inner: value}}`; one level, which is all the SDK's params use."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        outer, sep, rest = key.partition("[")
        if sep and rest.endswith("]") and outer and "[" not in rest[:-1]:
            nested = out.setdefault(outer, {})
            if not isinstance(nested, dict):
                raise ApiError(400, f"{outer} is given both as a value and as {key}", outer)
            nested[rest[:-1]] = value
        elif key in out and isinstance(out[key], dict):
            raise ApiError(400, f"{key} is given both as a value and as {key}[...]", key)
        else:
            out[key] = value
    return out


def _reference_image(name: str, value: Any, limits: Limits) -> bytes | None:
    """An image reference: `{"image_url": "data:..."}` (a JSON object, or its text in a form field),
    a data URL, or base64. `{"file_id": ...}` is refused: this server keeps no file store."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            raise ApiError(400, f"{name} is neither JSON, a data URL nor base64", name) from None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"image_url", "file_id"})
        if unknown:
            raise ApiError(400, f"{name} takes image_url (a data URL) or file_id, not {unknown[0]!r}", name)
        if "file_id" in value:
            raise ApiError(
                400,
                f"{name}.file_id: this server keeps no file store; send the image itself "
                "(an upload, or image_url as a data URL)",
                name,
            )
        value = value.get("image_url")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ApiError(400, f'{name} must be an image upload, a data URL, base64 or {{"image_url": ...}}', name)
    return decode_base64_image(value, limits, field=name)


def adapt_request(
    fields: dict[str, Any], image: bytes | None, limits: Limits
) -> tuple[dict[str, Any], bytes | None, list[str]]:
    """(fields in our schema's names, the image bytes, notes for the warnings), or an ApiError
    naming the first foreign field that cannot be honoured."""
    fields = fold_brackets(fields)
    notes: list[str] = []
    for name, why in REFUSED.items():
        if name in fields and fields[name] not in (None, "", {}):
            raise ApiError(400, f"{name} is not supported: {why}", name)
        fields.pop(name, None)
    for name, why in SWITCHES.items():
        if name in fields and parse_bool(name, fields.pop(name)):
            raise ApiError(400, f"{name} is not supported: {why}", name)
    for name in COUNTS:
        if name in fields and fields[name] not in (None, ""):
            value = fields.pop(name)
            if str(value).strip() not in ("1", "1.0"):
                raise ApiError(
                    400, f"{name} must be 1: each request makes one video here, got {str(value)[:20]!r}", name
                )
    if "quality" in fields:
        quality = fields.pop("quality")
        if quality not in (None, "") and str(quality).strip().lower() not in QUALITIES:
            raise ApiError(
                400,
                f"quality {str(quality)[:20]!r} is not offered: one quality here ({', '.join(QUALITIES)}); "
                "num_inference_steps and size decide it",
                "quality",
            )

    block = fields.pop(VIDEO_PARAMS, None)
    if isinstance(block, str) and block.strip():
        try:
            block = json.loads(block)
        except ValueError:
            raise ApiError(400, f"{VIDEO_PARAMS} must be a JSON object", VIDEO_PARAMS) from None
    if block not in (None, "", {}):
        if not isinstance(block, dict):
            raise ApiError(400, f"{VIDEO_PARAMS} must be an object of {', '.join(VIDEO_PARAM_KEYS)}", VIDEO_PARAMS)
        for key, value in block.items():
            if key not in VIDEO_PARAM_KEYS:
                raise ApiError(
                    400, f"{VIDEO_PARAMS}.{key} is not supported (only {', '.join(VIDEO_PARAM_KEYS)})", VIDEO_PARAMS
                )
            if fields.get(key) in (None, ""):
                fields[key] = value

    for alias, ours in ALIASES.items():
        value = fields.pop(alias, None)
        if value in (None, ""):
            continue
        if fields.get(ours) in (None, ""):
            fields[ours] = value
            notes.append(f"{alias} used as {ours} (Wan's classifier-free guidance)")
        elif str(value).strip() != str(fields[ours]).strip():
            notes.append(f"ignored {alias}: {ours} was given too and wins")

    references = [(name, fields.pop(name)) for name in (IMAGE_FIELD, REFERENCE_FIELD) if name in fields]
    for name, value in references:
        decoded = _reference_image(name, value, limits)
        if decoded is None:
            continue
        if image is not None:
            raise ApiError(400, f"give one input image: {name} came with another image", name)
        image = decoded
    return fields, image, notes
