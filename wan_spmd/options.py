"""Every flag of `generate`, `batch` and `serve` and every request field, declared once.

One row per option: its name (the HTTP form / JSON / JSONL key, and the CLI flag with dashes), the
type it takes, its default, its bounds or choices, its help, the help panel it is listed in, and
which commands take it. Made from this table: the typer commands' options (cli.py), the HTTP form
model (server/wire.py, through params.FIELDS), the JSONL keys (params.PARAM_KEYS), the defaults of
the option dataclasses (`Limits`, `HttpOptions`, `ServeOptions`, `EngineOptions`), and the checks of
every flag value (`parse`): a bad one is one line and exit 2 before anything heavy is imported.

Request fields are taken as text and validated by `params.resolve_params` alone (it knows the
model and the limits), so the CLI, HTTP and JSONL reject the same values with the same words.

Imports nothing but the standard library: the CLI reads it before torch, the server without it.

To add a flag, add a row. If it `feeds` one of the option dataclasses, that dataclass needs the
field (`name`, or `field=`) and the value gets there with nothing else written; otherwise the
command reads it as `values.NAME`.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENERATE, BATCH, SERVE = "generate", "batch", "serve"
RUN = frozenset({GENERATE, BATCH, SERVE})
"""The commands that load the model and run jobs."""
PANELS = ("Request", "Batch", "Model", "Parallel", "Server", "Limits")
"""The help's sections, in the order `--help` lists them."""
REQUEST, BATCH_PANEL, MODEL, PARALLEL, SERVER, LIMITS = PANELS
MODEL_DEFAULT = "model's default"
"""What help shows for a default that comes from the model's preset (configs/<family>.toml,
--config, the folder's generation.toml) rather than from the flag."""

MAX_NUMBER_CHARS = 32  # longer than any number an option takes (a seed has at most 19 digits)
# ASCII only: Python's int() and float() also take other scripts' digits ('²', '١') and underscores.
INT_TEXT = re.compile(r"[+-]?[0-9]+")
FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class Option:
    """One option. `type` is what its value is once parsed (for a request field, what a client
    should send); `bool` is an on/off flag pair, `list` a repeatable text flag."""

    name: str
    type: type
    default: Any
    help: str
    panel: str
    commands: frozenset[str]
    request: bool = False
    """A request field: an HTTP form/JSON key and a JSONL key too, validated by params.resolve_params."""
    min: float | None = None
    """Least value (inclusive)."""
    above: float | None = None
    """The value must be greater than this (a duration above 0)."""
    max: float | None = None
    """Greatest value (inclusive). A request field's is checked by params as its value is parsed."""
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    """What help shows for the value; by default its type's word, or its choices."""
    default_text: str | None = None
    """What help shows as the default when the default is not a value of the flag (None here)."""
    parse: Callable[[str], Any] | None = None
    """Text -> value for a value with syntax of its own; raises ValueError saying what is wrong."""
    envvar: str | None = None
    required: bool = False
    argument: bool = False
    """A positional argument rather than a --flag."""
    feeds: str | None = None
    """The option dataclass this value is a field of (Values.into): limits, http, serve, engine."""
    field: str | None = None
    """That dataclass's name for it, where it is not `name`."""
    deprecated: str | None = None
    """Kept so that old command lines still start: the warning printed (first) when it is given."""

    @property
    def flag(self) -> str:
        return self.name if self.argument else "--" + self.name.replace("_", "-")

    @property
    def shown_type(self) -> str:
        """What help shows after the flag: a type's word or the choices, never Python's `<str>`."""
        if self.metavar is not None:
            return self.metavar
        if self.choices:
            return "|".join(self.choices)
        return {int: "INTEGER", float: "NUMBER", Path: "PATH", list: "TEXT"}.get(self.type, "TEXT")

    def parsed_default(self) -> Any:
        return parse_value(self, self.default)


def _request(name: str, type_: type, help_: str, **kw: Any) -> Option:
    kw.setdefault("default_text", MODEL_DEFAULT)
    return Option(name, type_, None, help_, REQUEST, frozenset({GENERATE}), request=True, **kw)


def _generate(name: str, type_: type, default: Any, help_: str, **kw: Any) -> Option:
    return Option(name, type_, default, help_, REQUEST, frozenset({GENERATE}), **kw)


def _batch(name: str, type_: type, default: Any, help_: str, **kw: Any) -> Option:
    return Option(name, type_, default, help_, BATCH_PANEL, frozenset({BATCH}), **kw)


def _run(name: str, type_: type, default: Any, help_: str, panel: str, **kw: Any) -> Option:
    return Option(name, type_, default, help_, panel, RUN, **kw)


def _serve(name: str, type_: type, default: Any, help_: str, panel: str = SERVER, **kw: Any) -> Option:
    return Option(name, type_, default, help_, panel, frozenset({SERVE}), **kw)


WARMUP_SHAPE = re.compile(r"([0-9]+)x([0-9]+)x([0-9]+)")


def split_warmup_shapes(text: str) -> tuple[tuple[str, int, int, int], ...]:
    """`1280x720x81, 832x480x81` -> ((item, width, height, frames), ...); `none` -> (). Only the
    syntax: launch.parse_warmup_shapes checks the numbers against the model."""
    if text.strip().lower() in ("", "none"):
        return ()
    items = []
    for item in text.split(","):
        shown = item.strip()
        match = WARMUP_SHAPE.fullmatch(shown.lower()) if shown.isascii() else None
        if match is None:
            raise ValueError(f"--warmup-shapes: {shown!r} is not WIDTHxHEIGHTxFRAMES (e.g. 832x480x81)")
        width, height, frames = (int(g) for g in match.groups())
        items.append((shown, width, height, frames))
    return tuple(items)


def _warmup_text(text: str) -> str:
    split_warmup_shapes(text)  # refused here, before the model is read; parsed against it later
    return text


def octal_mode(text: str) -> int:
    """`660` -> 0o660: permissions that let the owner read and write."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or not mode & 0o600 == 0o600:
        raise ValueError(
            f"--uds-mode must be octal permissions that let the owner read and write (e.g. 600), got {text}"
        )
    return mode


def gpu_memory_text(text: str) -> str:
    """`--gpu-memory`'s syntax: auto, GiB per card (48) or a fraction of the card (0.9). The card's
    memory is read later (memory.parse_gpu_memory, with torch); only the text is checked here."""
    value = text.strip().lower()
    if value == "auto":
        return text
    if len(value) > MAX_NUMBER_CHARS or not FLOAT_TEXT.fullmatch(value):
        raise ValueError(f"--gpu-memory must be GiB per card (e.g. 80), a fraction (e.g. 0.9) or auto, got {text!r}")
    if not 0 < float(value) < math.inf:
        raise ValueError(f"--gpu-memory must be a positive number, got {text!r}")
    return text


ATTENTION_CHOICES = ("auto", "sdpa", "fa3", "fa3-fp8")
"""kernels.ATTENTION_CHOICES, repeated here without torch (a unit test keeps them equal)."""
QUANT_CHOICES = ("none", "fp8")
"""--quant: the experts' linears as they are, or fp8 rowwise (engine.py, kernels.quantize_fp8)."""
OFFLOAD_CHOICES = ("auto", "none", "text-encoder", "experts")
"""memory.OFFLOAD_CHOICES' keys, repeated here (a unit test keeps them equal)."""
VAE_DTYPES = ("fp32", "bf16")
CACHE_BACKENDS = ("none", "cache_dit", "tea_cache", "mag_cache")
"""--cache-backend's names (vllm-omni's); launch.parse_cache_spec builds the backend from them."""
CACHE_DIT_REFUSED = (
    "--cache-backend cache_dit is not offered: cache-dit 1.5.3's pins fit ours (torch>=2.7.1, diffusers>=0.36), "
    "but it patches diffusers' transformer forward, which our parallel experts do not run, and decides each skip "
    "from its own rank's token shard, so ranks would decide differently and hang; use tea_cache or mag_cache"
)


def cache_backend_text(text: str) -> str:
    """--cache-backend: one of CACHE_BACKENDS (any case); cache_dit refused with its reason."""
    name = text.strip().lower()
    if name not in CACHE_BACKENDS:
        raise ValueError(f"--cache-backend must be one of {', '.join(CACHE_BACKENDS)}, got {text!r}")
    if name == "cache_dit":
        raise ValueError(CACHE_DIT_REFUSED)
    return text


def cache_config_text(text: str) -> str:
    """--cache-config's syntax, a JSON object; its keys are checked against the backend later
    (launch.parse_cache_spec, which knows each backend's)."""
    if text.strip():
        try:
            given = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--cache-config is not JSON ({exc.msg} at character {exc.pos})") from None
        if not isinstance(given, dict):
            raise ValueError("--cache-config must be a JSON object, e.g. '{\"rel_l1_thresh\": 0.2}'")
    return text


SCHEDULERS = ("default", "euler")
"""default: the model folder's scheduler (UniPC for Wan2.2); euler: flow-matching Euler whose sigmas,
before the shift, are 1, 1 - 1/n, ..., 1/n (lightx2v's Wan22StepDistillScheduler; ComfyUI's
euler sampler with the simple schedule)."""

# fmt: off
OPTIONS: tuple[Option, ...] = (
    # -- Request: the fields every front shares (generate's flags, the HTTP form, JSONL keys), then
    #    generate's own input and output. The image is each front's own: an `input_reference`
    #    upload over HTTP, an `image` path in the CLI and JSONL.
    _request("prompt", str, "What the video shows (required).", default_text=None),
    _request("negative_prompt", str, "What to steer away from."),
    _request("size", str, "WIDTHxHEIGHT in multiples of the model's (16 A14B, 32 TI2V), e.g. 1280x720.",
             metavar="WxH"),
    _request("width", int, "Frame width in pixels, given with height; size wins."),
    _request("height", int, "Frame height in pixels, given with width; size wins."),
    _request("seconds", float, "Duration; num_frames = seconds x fps rounded down to 4k+1.", max=3600.0),
    _request("fps", int, "Frames per second of the video."),
    _request("num_frames", int, "4k+1 frames, e.g. 81; wins over seconds."),
    _request("num_inference_steps", int, "Denoising steps."),
    _request("guidance_scale", float, "CFG scale of the high-noise expert; CFG runs only when > 1.", max=100.0),
    _request("guidance_scale_2", float, "CFG scale of the low-noise expert (defaults to guidance_scale).",
             max=100.0, default_text="guidance_scale"),
    _request("boundary_ratio", float, "Where the two experts switch, in [0, 1] (the model's own by default).",
             default_text="the model folder's"),
    _request("flow_shift", float, "Shift of the flow-matching noise schedule.", max=100.0),
    _request("scheduler", str, "default (the model folder's, UniPC) or euler (flow-matching Euler over evenly "
             "spaced steps, as the 4-step distillation LoRAs are sampled).", choices=SCHEDULERS),
    _request("seed", int, "Random seed; a random one (reported) when absent.", default_text="random"),
    _request("cache_threshold", float, "The step cache's threshold for this request (tea_cache: rel_l1_thresh, "
             "mag_cache: magcache_thresh; higher skips more); ignored without --cache-backend.", max=10.0,
             default_text="--cache-config's"),
    _generate("image", str, None, "Input image path (image-to-video models).", metavar="PATH"),
    _generate("output", Path, "output.mp4", "Where the mp4 goes."),
    _generate("frames_dir", Path, None, "Also write every frame as a lossless PNG here."),
    # -- Batch
    _batch("requests", Path, None, "JSONL file: one request per line (the HTTP form's keys, plus image = a path, "
           "id, output).", argument=True, required=True),
    _batch("output_dir", Path, None, "Where the mp4s and results.jsonl go.", required=True),
    # text, so that `auto` gets through; batch.check_args reads it (with the scheduler's variables)
    _batch("shard_index", str, None, "This run's shard, 0..num-shards-1, or auto: SLURM_ARRAY_TASK_ID or "
           "JOB_COMPLETION_INDEX.", metavar="I|auto"),
    _batch("num_shards", str, None, "Split the batch over this many runs by job id, or auto: "
           "SLURM_ARRAY_TASK_COUNT.", metavar="K|auto"),
    # -- Model: what is loaded, and how
    _run("model", str, "tiny", "A local diffusers-format Wan2.2 folder, or 'tiny' (random weights, noise not art).",
         MODEL, metavar="DIR|tiny"),
    _run("config", str, None, "A built-in defaults preset, e.g. wan2.2-i2v-a14b.", MODEL, metavar="PRESET",
         default_text="the model's family"),
    _run("load_format", str, "auto", "auto (the folder's weights) or dummy (random weights, e.g. --model "
         "wan2.2-i2v-a14b).", MODEL, choices=("auto", "dummy"), feeds="engine"),
    _run("device", str, "auto", "auto (cuda:LOCAL_RANK if a GPU is visible), cuda or cpu.", MODEL,
         choices=("auto", "cuda", "cpu"), feeds="engine"),
    _run("vae_dtype", str, "fp32", "VAE precision for encode and decode.", MODEL, choices=VAE_DTYPES,
         feeds="engine"),
    _run("attention", str, "auto", "Attention kernel: auto (FA3 bf16 where it runs, Hopper; else sdpa), sdpa, fa3 "
         "or fa3-fp8 (q, k, v in fp8 per head).", MODEL, choices=ATTENTION_CHOICES, feeds="engine"),
    _run("quant", str, "none", "none, or fp8: the experts' linears in fp8 rowwise (after LoRA fusion and TP "
         "slicing).", MODEL, choices=QUANT_CHOICES, feeds="engine"),
    _run("gpu_memory", str, "auto", "GPU memory each card may use: GiB (e.g. 48), a fraction of the card (e.g. "
         "0.9), or auto (all of it). The placement (what stays on the card, what waits in host memory) is "
         "planned for it before loading.", MODEL, metavar="GIB|FRACTION|auto", parse=gpu_memory_text),
    _run("offload", str, "auto", "auto (the cheapest placement that fits --gpu-memory), none, text-encoder (to "
         "host memory between prompts), or experts (also each expert on the card only while it runs).", MODEL,
         choices=OFFLOAD_CHOICES),
    _run("prompt_cache", int, 16, "Prompt embeddings kept across requests (4 MiB each in bf16); 0 disables.",
         MODEL, min=0, metavar="ENTRIES", feeds="engine"),
    _run("condition_cache", int, 8, "I2V image conditions kept across requests (24 MB each at 720p); 0 disables.",
         MODEL, min=0, metavar="ENTRIES", feeds="engine"),
    _run("vae_encode_reuse", bool, True, "Reuse repeated work inside the I2V condition's encode (exact; holds "
         "~6.5 GB more at 720p fp32).", MODEL, feeds="engine"),
    _run("compile", bool, None, "Compile the experts' repeated blocks.", MODEL,
         default_text="on with CUDA, off on the CPU", feeds="engine"),
    _run("warmup_shapes", str, None, "Shapes whose transformer forwards compile before ready ('none' for none).", MODEL,
         metavar="WxHxF,...", parse=_warmup_text,
         default_text="with --compile: serve the preset's shape, generate/batch their jobs' shapes"),
    _run("compile_cache", str, None, "Keep what --compile compiles here across restarts, one subfolder per "
         "torch/GPU/layout/model/attention/quant key; ranks and replicas may share it ('none': no cache).", MODEL,
         metavar="DIR|none", default_text="$XDG_CACHE_HOME/wan_spmd/compile"),
    _run("cache_backend", str, "none", "Step caching: none, tea_cache or mag_cache (skip transformer blocks on "
         "steps that change little; vllm-omni's flag). cache_dit is refused with the reason.", MODEL,
         metavar="|".join(CACHE_BACKENDS), parse=cache_backend_text),
    _run("cache_config", str, None, "JSON for the backend, e.g. '{\"rel_l1_thresh\": 0.2}' (tea_cache: "
         "rel_l1_thresh, ret_steps, coefficients; mag_cache: magcache_thresh, magcache_K, retention_ratio, "
         "mag_ratios).", MODEL, metavar="JSON", parse=cache_config_text),
    _run("enable_cache_dit_summary", bool, False, "Log each request's step-cache summary (skipped forwards).",
         MODEL),
    _run("lora", list, None, "A LoRA (.safetensors) fused into every expert at load; repeatable.", MODEL,
         metavar="PATH[:SCALE]"),
    _run("lora_high", list, None, "A LoRA fused into the high-noise expert only.", MODEL, metavar="PATH[:SCALE]"),
    _run("lora_low", list, None, "A LoRA fused into the low-noise expert only.", MODEL, metavar="PATH[:SCALE]"),
    # -- Parallel: how the ranks split the model, and how long they wait for each other
    _run("tp", int, None, "Tensor-parallel degree.", PARALLEL, min=1,
         default_text="what --ulysses and --cfg-parallel leave of the world size"),
    _run("ulysses", int, 1, "Ulysses sequence-parallel degree: tokens split, all-to-all to heads around "
         "self-attention.", PARALLEL, min=1),
    _run("cfg_parallel", bool, False, "Run the two guidance branches on two rank groups (world = tp x ulysses "
         "x 2).", PARALLEL),
    _run("collective_timeout", float, 600.0, "Seconds a rank waits in a collective inside a job (idle ranks "
         "never do).", PARALLEL, above=0, metavar="SECONDS", feeds="engine", field="collective_timeout_s"),
    _run("heartbeat_timeout", float, 60.0, "Seconds before a dead or stuck rank is noticed on the control "
         "plane (then exit 1).", PARALLEL, above=0, metavar="SECONDS", feeds="engine", field="heartbeat_timeout_s"),
    _run("stop_grace", float, 15.0, "Seconds after SIGTERM/SIGINT before a rank stuck in a collective ends "
         "itself.", PARALLEL, above=0, metavar="SECONDS", feeds="engine", field="stop_grace_s"),
    _run("load_timeout", float, 1800.0, "Seconds the ranks wait for each other to load.", PARALLEL, above=0,
         metavar="SECONDS", feeds="engine", field="load_timeout_s"),
    # -- Server
    _serve("host", str, "127.0.0.1", "Address to listen on (loopback by default).", metavar="ADDRESS",
           feeds="serve"),
    _serve("port", int, 8000, "TCP port; 0 picks a free one (logged).", min=0, max=65535, feeds="serve"),
    _serve("uds", str, None, "Listen on this Unix socket instead of TCP.", metavar="PATH"),
    _serve("uds_mode", str, "600", "Octal permissions of the --uds socket file, e.g. 660 to let a group "
           "connect.", metavar="OCTAL", parse=octal_mode, feeds="http"),
    _serve("output_dir", Path, "outputs", "Every finished video is also kept here.", feeds="serve"),
    _serve("api_key", str, None, "Require Authorization: Bearer KEY (all but /health). Visible in ps: prefer "
           "--api-key-file.", metavar="KEY", envvar="WAN_SPMD_API_KEY"),
    _serve("api_key_file", Path, None, "Read the API key from this file (its first line), out of sight of ps."),
    _serve("served_model_name", list, None, "Name in /v1/models; give it again for more names (aliases) a "
           "request may use.", metavar="NAME", default_text="--model"),
    _serve("replica_name", str, None, "Put in every job id (video_NAME_...) so a balancer can route polls. "
           "Replicas sharing --output-dir need different names.", metavar="NAME", default_text="the host name"),
    _serve("job_lease", float, 60.0, "Replicas sharing --output-dir: seconds without renewing its lease after "
           "which a replica is taken for dead and the others fail its unfinished jobs.", above=0,
           metavar="SECONDS", feeds="serve", field="job_lease_s"),
    _serve("sync_videos", bool, False, "POST /v1/videos from a plain client waits and answers the mp4 as base64 "
           "(vllm-omni's earlier API); the OpenAI SDK and `Prefer: respond-async` still get a queued job. "
           "Default: every client gets one."),
    _serve("async_videos", bool, False, "Deprecated, does nothing: POST /v1/videos is asynchronous by default.",
           deprecated="--async-videos is deprecated and does nothing: POST /v1/videos is asynchronous by default "
           "(--sync-videos restores the synchronous answer)"),
    _serve("strict_sizes", bool, False, "A size not a multiple of the model's, or frames not 4k+1, is a 400 "
           "(default: rounded and reported)."),
    _serve("keep_jobs", int, 1000, "Finished video jobs kept (records and files); the oldest finished goes "
           "first.", min=1, feeds="serve"),
    _serve("job_ttl", float, None, "Seconds a finished job's records and files are kept (its expires_at).",
           above=0, metavar="SECONDS", default_text="no limit", feeds="serve", field="job_ttl_s"),
    # -- Limits: what one request may ask, and what clients may hold
    _run("max_width", int, 1920, "Widest frame accepted.", LIMITS, min=1, feeds="limits"),
    _run("max_height", int, 1920, "Tallest frame accepted.", LIMITS, min=1, feeds="limits"),
    _run("max_frames", int, 161, "Most frames accepted.", LIMITS, min=1, feeds="limits"),
    _run("max_steps", int, 200, "Most denoising steps accepted.", LIMITS, min=1, feeds="limits"),
    _run("max_fps", int, 60, "Highest frame rate accepted.", LIMITS, min=1, feeds="limits"),
    _run("max_prompt_chars", int, 10_000, "Longest prompt (and negative prompt) in characters.", LIMITS, min=1,
         feeds="limits"),
    _run("max_work", int, 15_000_000, "Most work per job: estimated token-steps, attention and decoding counted "
         "(the default admits A14B 1280x720x81 at 54 steps).", LIMITS, min=1, feeds="limits"),
    _run("max_image_pixels", int, 25_000_000, "Most pixels of an input image, checked before decoding.", LIMITS,
         min=1, feeds="limits"),
    _run("job_deadline", float, 3600.0, "Seconds a job of --max-work may run; a job of work W gets this x "
         "max(W / max-work, 0.1), then it is stopped at its next step or decoded chunk and fails.", LIMITS, above=0,
         metavar="SECONDS", feeds="limits", field="deadline_s_at_max_work"),
    _serve("max_upload_bytes", int, 20 * 1024 * 1024, "Largest image upload; 413 beyond.", LIMITS, min=1,
           metavar="BYTES", feeds="limits"),
    _serve("max_queue", int, 16, "Requests that may wait; more get 429.", LIMITS, min=1, feeds="serve"),
    _serve("max_connections", int, 64, "HTTP connections held at once; when full, the one idle longest is "
           "closed.", LIMITS, min=1, feeds="http"),
    _serve("header_timeout", float, 10.0, "Seconds a connection may take to send a request's headers (then "
           "408, closed).", LIMITS, above=0, metavar="SECONDS", feeds="http", field="header_timeout_s"),
    _serve("body_timeout", float, 60.0, "Seconds a request may take to send its body after its headers (then "
           "408, closed).", LIMITS, above=0, metavar="SECONDS", feeds="http", field="body_timeout_s"),
    _serve("send_timeout", float, 60.0, "Seconds an answer may go without the client taking a byte of it (then "
           "closed), as nginx's.", LIMITS, above=0, metavar="SECONDS", feeds="http", field="send_timeout_s"),
)
# fmt: on

REQUEST_FIELDS = tuple(o for o in OPTIONS if o.request)


def options_of(command: str) -> tuple[Option, ...]:
    """The command's options in the order help lists them: by panel, then as in the table."""
    own = [o for o in OPTIONS if command in o.commands]
    return tuple(sorted(own, key=lambda o: PANELS.index(o.panel)))


def option(name: str, command: str | None = None) -> Option:
    """The row called `name` (of `command`, where two commands each have their own)."""
    rows = [o for o in OPTIONS if o.name == name and (command is None or command in o.commands)]
    if len(rows) != 1:
        raise KeyError(f"{len(rows)} options called {name!r}" + (f" for {command}" if command else ""))
    return rows[0]


def default(name: str, command: str | None = None) -> Any:
    """An option's default value, parsed: what the option dataclasses take as theirs."""
    return option(name, command).parsed_default()


def _number(o: Option, text: Any) -> int | float:
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise ValueError(f"{o.flag} must be a number, got {text!r}")
    shown = str(text).strip()
    if o.type is int:
        if isinstance(text, float) or len(shown) > MAX_NUMBER_CHARS or not INT_TEXT.fullmatch(shown):
            raise ValueError(f"{o.flag} must be an integer, got {text!r}")
        return int(shown)
    if shown.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        raise ValueError(f"{o.flag} must be a finite number, got {text!r}")
    if len(shown) > MAX_NUMBER_CHARS or not (isinstance(text, int | float) or FLOAT_TEXT.fullmatch(shown)):
        raise ValueError(f"{o.flag} must be a number, got {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{o.flag} must be a finite number, got {text!r}")
    return value


def _shown(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


def _bounds(o: Option, value: float) -> None:
    got = f"got {_shown(value)}"
    unit = {"SECONDS": " seconds", "ENTRIES": " entries"}.get(o.metavar or "", "")
    if o.min is not None and o.max is not None and not o.min <= value <= o.max:
        raise ValueError(f"{o.flag} must be within {_shown(o.min)}..{_shown(o.max)}, {got}")
    if o.min is not None and value < o.min:
        raise ValueError(f"{o.flag} must be >= {_shown(o.min)}{unit}, {got}")
    if o.above is not None and not value > o.above:
        raise ValueError(f"{o.flag} must be > {_shown(o.above)}{unit}, {got}")
    if o.max is not None and value > o.max:
        raise ValueError(f"{o.flag} must be <= {_shown(o.max)}, {got}")


def parse_value(o: Option, value: Any) -> Any:
    """One given value -> its typed value, or ValueError naming the flag. A request field stays as
    given (params.resolve_params reads it)."""
    if value is None or o.request:
        return value
    if o.type is bool or o.type is list:
        return value
    if o.type in (int, float):
        value = _number(o, value)
        _bounds(o, value)
        return value
    if o.choices and value not in o.choices:
        raise ValueError(f"{o.flag} must be one of {', '.join(o.choices)}, got {value!r}")
    if o.parse is not None:
        return o.parse(value)
    return Path(value) if o.type is Path else value


class Values:
    """One command's options, parsed: `values.max_work`; `values.request` is the request fields
    given (text, for params.resolve_params); `values.into(Limits, "limits")` builds an option
    dataclass from the rows that feed it."""

    def __init__(self, command: str, values: Mapping[str, Any]) -> None:
        self.command = command
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"{self.__dict__.get('command')} has no option {name!r}") from None

    @property
    def request(self) -> dict[str, Any]:
        return {o.name: self._values[o.name] for o in REQUEST_FIELDS if self._values.get(o.name) is not None}

    def into(self, cls: Callable[..., Any], feeds: str, **computed: Any) -> Any:
        """`cls(...)` from this command's rows that feed it, plus `computed` values (which win)."""
        given = {o.field or o.name: self._values[o.name] for o in options_of(self.command) if o.feeds == feeds}
        return cls(**{**given, **computed})


def parse(command: str, given: Mapping[str, Any]) -> Values:
    """Every option of `command` from what the command line gave (None: absent), checked in the
    table's order; the first bad value raises ValueError with one line naming its flag."""
    values = {}
    for o in options_of(command):
        value = given.get(o.name)
        values[o.name] = parse_value(o, o.default if value is None else value)
    return Values(command, values)


def deprecations(command: str, given: Mapping[str, Any]) -> list[str]:
    """The warnings for the deprecated options given (not None, not False): said before any check,
    so that a script passing one learns it even when another flag stops the start."""
    return [o.deprecated for o in options_of(command) if o.deprecated and given.get(o.name) not in (None, False)]


def suggest(command: str, typed: str, limit: int = 3) -> list[str]:
    """The flags a mistyped `typed` most likely meant: those holding its words (`--steps` ->
    --num-inference-steps, --max-steps; request flags first), then near spellings (`--promt`)."""
    rows = options_of(command)
    flags = [o.flag for o in rows if not o.argument] + [f"--no-{o.flag[2:]}" for o in rows if o.type is bool]
    words = [w for w in re.split(r"[-_]", typed.lstrip("-").lower()) if len(w) >= 3]

    def same_word(word: str, own: str) -> bool:  # steps ~ steps, step ~ steps, frame ~ frames
        return own.startswith(word) or (len(own) >= 3 and word.startswith(own))

    by_words = [f for f in flags if words and all(any(same_word(w, a) for a in f[2:].split("-")) for w in words)]
    near = difflib.get_close_matches(typed, flags, n=limit, cutoff=0.75)
    return list(dict.fromkeys([*by_words, *near]))[:limit]
