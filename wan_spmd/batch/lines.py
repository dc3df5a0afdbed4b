"""A JSONL line of a batch: parsed cheaply up front (JSON, id, output name: enough to count a
shard's work and to know what a previous run finished), and validated with the one request schema
only when the runner asks for it (`validate_line`). Nothing a line holds can raise out of
`scan_line`: whatever is wrong with it becomes the entry's error."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from wan_spmd.params import PARAM_KEYS, GenerationParams, Limits, RequestError, read_image_file, resolve_params

if TYPE_CHECKING:
    from wan_spmd.config import ModelInfo

# What a line's derived id and its fingerprint cover: the generation parameters, the image path as
# written and the output name. Not `id` (it is what we derive) and not unknown keys (ignored).
FINGERPRINT_KEYS = (*PARAM_KEYS, "image", "output")
ID_HEX_CHARS = 16  # 64 bits: collisions among a batch's lines are out of reach
MAX_NAME_CHARS = 200  # per path component, under every filesystem's 255-byte limit for ASCII


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def fingerprint(request: Mapping[str, Any]) -> str:
    """A hash of what a line asks for, independent of key order and of blank values (which the schema
    treats as absent), so an unchanged line keeps it across runs. The image is hashed as a path as
    written, not its content: moving the JSONL file with its images keeps every id."""
    picked = {k: request[k] for k in FINGERPRINT_KEYS if k in request and not _is_blank(request[k])}
    canonical = json.dumps(picked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a lone surrogate (JSON "\ud800") still hashes; validation refuses it later
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def derive_id(params_hash: str) -> str:
    return params_hash[:ID_HEX_CHARS]


def safe_output_name(value: Any) -> PurePosixPath:
    """An `output` from a line as a path relative to OUT, refused (never rewritten) if it could leave
    OUT or clash with our own files: absolute, `..`, hidden or empty parts, backslashes, control
    characters, or not an .mp4. Subfolders (`shots/a.mp4`) are fine."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError("output must be a non-empty file name such as clip.mp4", "output")
    if "\\" in value or any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise RequestError(
            f"output {_escaped(value)} has a backslash, a control character or a lone surrogate", "output"
        )
    if value.startswith("/"):
        raise RequestError(f"output {value!r} is absolute; give a name relative to --output-dir", "output")
    parts = value.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise RequestError(
                f"output {value!r} has an empty, '.' or '..' part; it must stay in --output-dir", "output"
            )
        if part.startswith("."):
            raise RequestError(f"output {value!r} has a hidden part {part!r}", "output")
        if len(part) > MAX_NAME_CHARS:
            raise RequestError(f"output {value!r} has a part over {MAX_NAME_CHARS} characters", "output")
    if not parts[-1].endswith(".mp4") or parts[-1] == ".mp4":
        raise RequestError(f"output {value!r} must be an .mp4 file name", "output")
    return PurePosixPath(*parts)


def default_output_name(job_id: str) -> PurePosixPath:
    """`{id}.mp4`, with any character of an explicit id that is not safe in a file name made `_`."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", job_id).lstrip(".")[:MAX_NAME_CHARS] or "_"
    return PurePosixPath(f"{stem}.mp4")


def output_path(out_dir: Path, name: PurePosixPath) -> Path:
    """OUT/name, refused if a symlinked folder inside OUT would take it elsewhere."""
    path = out_dir / name
    root = out_dir.resolve()
    if not path.resolve().is_relative_to(root):
        raise RequestError(f"output {str(name)!r} leads outside --output-dir (through a symlink)", "output")
    return path


@dataclass(frozen=True)
class Entry:
    """One non-blank line, parsed but not yet validated."""

    line: int
    """1-based line number in the file (blank lines count)."""
    id: str | None = None
    """Explicit or derived; None when the line could not be parsed far enough to have one."""
    params_hash: str | None = None
    request: dict[str, Any] | None = None
    output: PurePosixPath | None = None
    error: str | None = None
    """Why the line cannot run, known before validation (not JSON, bad id or output)."""


def _escaped(value: Any, limit: int = 80) -> str:
    """A line's value in a message: repr'd (lone surrogates escaped), at most `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scan_line(line_no: int, raw: bytes) -> Entry | None:
    """Parse one line (None if blank): JSON, id, output name. No files are touched, and nothing a
    line holds can raise out of here: whatever is wrong with it becomes the entry's error."""
    try:
        return _scan_line(line_no, raw)
    except Exception as exc:  # a line must never stop the batch (nor its up-front count)
        return Entry(line_no, error=f"cannot be parsed ({type(exc).__name__}: {_escaped(str(exc))})")


def _scan_line(line_no: int, raw: bytes) -> Entry | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Entry(line_no, error=f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    text = text.lstrip("\ufeff").strip()
    if not text:
        return None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        return Entry(line_no, error=f"not JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return Entry(line_no, error="not JSON we read: nested too deeply")
    except ValueError as exc:  # an integer of more than 4300 digits
        return Entry(line_no, error=f"not JSON we read: {_escaped(str(exc))}")
    if not isinstance(request, dict):
        return Entry(line_no, error=f"not a JSON object but a {type(request).__name__}")
    params_hash = fingerprint(request)
    raw_id = request.get("id")
    if raw_id is None:
        job_id = derive_id(params_hash)
    elif (isinstance(raw_id, str) and raw_id.strip() and len(raw_id) <= MAX_NAME_CHARS) or (
        isinstance(raw_id, int) and not isinstance(raw_id, bool) and abs(raw_id) < 10**MAX_NAME_CHARS
    ):
        job_id = str(raw_id).strip()
    else:
        return Entry(
            line_no,
            request=request,
            error=f"id must be a non-empty string of at most {MAX_NAME_CHARS} characters, got {_escaped(raw_id)}",
        )
    entry = Entry(line_no, job_id, params_hash, request)
    try:
        output = safe_output_name(request["output"]) if "output" in request else default_output_name(job_id)
    except RequestError as exc:
        return dataclasses.replace(entry, error=str(exc))
    return dataclasses.replace(entry, output=output)


def iter_entries(path: Path) -> Iterator[Entry]:
    """The file's non-blank lines, one at a time (a huge batch is never held in memory)."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            entry = scan_line(line_no, raw)
            if entry is not None:
                yield entry


def validate_line(
    request: dict[str, Any], base_dir: Path, info: ModelInfo, defaults: Mapping[str, Any], limits: Limits
) -> GenerationParams:
    """The one schema (params.resolve_params), with the image read from a path beside the file."""
    if "input_reference" in request:
        raise RequestError(
            "a JSONL line gives its image as `image` (a file path), not input_reference", "input_reference"
        )
    image = None
    if not _is_blank(request.get("image")):
        raw = request["image"]
        if not isinstance(raw, str):
            raise RequestError(f"image must be a file path, got {_escaped(raw)}", "image")
        # `~...` and absolute paths as written; others relative to the JSONL file (read_file checks
        # the rest: NUL, unknown home folders, non-regular files, size before reading)
        path = raw if raw.startswith(("~", "/")) else str(base_dir / raw)
        image = read_image_file(path, max_bytes=limits.max_upload_bytes)
    params = resolve_params(request, info=info, defaults=defaults, limits=limits, image=image)
    if "model" in request:
        note = "ignored model: a batch runs the --model it was started with"
        params = dataclasses.replace(params, warnings=(*params.warnings, note))
    return params
