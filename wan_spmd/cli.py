"""The `wan_spmd` command line: generate, make-tiny, serve, batch.

Every command runs the same way alone or under `torchrun --nproc-per-node N -m wan_spmd ...`.
Arguments are checked on every rank before the process group starts; a bad one exits 2 with one
line (printed by rank 0 only) and no traceback.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wan_spmd.compile_cache import parse_compile_cache
from wan_spmd.config import TINY_NOTE, ModelFolderError, ModelInfo, generation_defaults
from wan_spmd.launch import (
    VAE_DTYPES,
    ParallelLayout,
    WarmupShape,
    check_family,
    check_hosts,
    check_layout,
    parse_cache_spec,
    parse_lora_specs,
    parse_warmup_shapes,
    preset_warmup_shape,
    resolve_layout,
    resolve_model,
)
from wan_spmd.params import FIELDS, Limits, RequestError, read_image_file, resolve_params
from wan_spmd.process import env_int, finish_process, setup_logging, torchrun_env
from wan_spmd.server.options import HttpOptions

if TYPE_CHECKING:
    from wan_spmd.engine import EngineOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Serve Wan2.2 video diffusion as one torchrun SPMD program.",
)


class CliExit(Exception):
    """Exit with a code after printing one line (rank 0 only)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn bad input into a one-line `error:` and exit status 2."""
    try:
        yield
    except (RequestError, ModelFolderError) as exc:
        raise CliExit(f"error: {exc}") from None
    except ValueError as exc:  # torchrun/device mismatches and other checks with a message
        raise CliExit(f"error: {exc}") from None


# -- shared options ----------------------------------------------------------------------------
ModelOpt = Annotated[
    str, typer.Option(help="A local diffusers-format Wan2.2 folder, or 'tiny' (random weights, noise not art).")
]
ConfigOpt = Annotated[str | None, typer.Option(help="A built-in defaults preset, e.g. wan2.2-i2v-a14b.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda:LOCAL_RANK if a GPU is visible), cuda or cpu.")]
MaxWidthOpt = Annotated[int, typer.Option(help="Widest frame accepted.")]
MaxHeightOpt = Annotated[int, typer.Option(help="Tallest frame accepted.")]
MaxFramesOpt = Annotated[int, typer.Option(help="Most frames accepted.")]
MaxStepsOpt = Annotated[int, typer.Option(help="Most denoising steps accepted.")]
MaxFpsOpt = Annotated[int, typer.Option(help="Highest frame rate accepted.")]
MaxPromptCharsOpt = Annotated[int, typer.Option(help="Longest prompt (and negative prompt) in characters.")]
MaxWorkOpt = Annotated[
    int,
    typer.Option(
        help="Most work per job: estimated token-steps, attention and decoding counted (the default admits "
        "A14B 1280x720x81 at 54 steps)."
    ),
]
MaxImagePixelsOpt = Annotated[int, typer.Option(help="Most pixels of an input image, checked before decoding.")]
JobDeadlineOpt = Annotated[
    float,
    typer.Option(
        help="Seconds a job of --max-work may run; a job of work W gets this x max(W / max-work, 0.1), "
        "then it is stopped at its next step or decoded chunk and fails."
    ),
]
LoadFormatOpt = Annotated[
    str, typer.Option(help="auto (the folder's weights) or dummy (random weights, e.g. --model wan2.2-i2v-a14b).")
]

TpOpt = Annotated[
    int | None,
    typer.Option(help="Tensor-parallel degree (default: what --ulysses and --cfg-parallel leave of the world size)."),
]
UlyssesOpt = Annotated[
    int, typer.Option(help="Ulysses sequence-parallel degree: tokens split, all-to-all to heads around self-attention.")
]
CfgParallelOpt = Annotated[
    bool,
    typer.Option(
        "--cfg-parallel/--no-cfg-parallel",
        help="Run the two guidance branches on two rank groups (world = tp x ulysses x 2).",
    ),
]
CollectiveTimeoutOpt = Annotated[
    float, typer.Option(help="Seconds a rank waits in a collective inside a job (idle ranks never do).")
]
HeartbeatTimeoutOpt = Annotated[
    float, typer.Option(help="Seconds before a dead or stuck rank is noticed on the control plane (then exit 1).")
]
StopGraceOpt = Annotated[
    float, typer.Option(help="Seconds after SIGTERM/SIGINT before a rank stuck in a collective ends itself.")
]
LoadTimeoutOpt = Annotated[float, typer.Option(help="Seconds the ranks wait for each other to load.")]
CompileOpt = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile", help="Compile the experts' repeated blocks (default: on with CUDA, off on the CPU)."
    ),
]
WarmupOpt = Annotated[
    str | None,
    typer.Option(
        help="WxHxF,... shapes whose transformer forwards compile before ready (default with --compile: serve "
        "the preset's shape, "
        "generate/batch their jobs' shapes; 'none' for none)."
    ),
]
CompileCacheOpt = Annotated[
    str | None,
    typer.Option(
        metavar="DIR|none",
        help="Keep what --compile compiles here across restarts, one subfolder per torch/GPU/layout/model/"
        "attention/quant key; ranks and replicas may share it (default: $XDG_CACHE_HOME/wan_spmd/compile; "
        "'none': no cache).",
    ),
]
VaeDtypeOpt = Annotated[str, typer.Option(help="VAE precision for encode and decode: fp32 or bf16.")]
GpuMemoryOpt = Annotated[
    str,
    typer.Option(
        help="GPU memory each card may use: GiB (e.g. 48), a fraction of the card (e.g. 0.9), or auto (all of it). "
        "The placement (what stays on the card, what waits in host memory) is planned for it before loading."
    ),
]
OffloadOpt = Annotated[
    str,
    typer.Option(
        help="auto (the cheapest placement that fits --gpu-memory), none, text-encoder (to host memory between "
        "prompts), or experts (also each expert on the card only while it runs)."
    ),
]
PromptCacheOpt = Annotated[
    int, typer.Option(help="Prompt embeddings kept across requests (4 MiB each in bf16); 0 disables.")
]
VaeEncodeReuseOpt = Annotated[
    bool,
    typer.Option(
        "--vae-encode-reuse/--no-vae-encode-reuse",
        help="Reuse repeated work inside the I2V condition's encode (exact; holds ~6.5 GB more at 720p fp32).",
    ),
]
ConditionCacheOpt = Annotated[
    int, typer.Option(help="I2V image conditions kept across requests (24 MB each at 720p); 0 disables.")
]
LoraOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--lora", metavar="PATH[:SCALE]", help="A LoRA (.safetensors) fused into every expert at load; repeatable."
    ),
]
LoraHighOpt = Annotated[
    list[str] | None,
    typer.Option("--lora-high", metavar="PATH[:SCALE]", help="A LoRA fused into the high-noise expert only."),
]
LoraLowOpt = Annotated[
    list[str] | None,
    typer.Option("--lora-low", metavar="PATH[:SCALE]", help="A LoRA fused into the low-noise expert only."),
]
CacheBackendOpt = Annotated[
    str,
    typer.Option(
        help="Step caching: none, tea_cache or mag_cache (skip transformer blocks on steps that change little; "
        "vllm-omni's flag). cache_dit is refused with the reason."
    ),
]
CacheConfigOpt = Annotated[
    str | None,
    typer.Option(
        help="JSON for the backend, e.g. '{\"rel_l1_thresh\": 0.2}' (tea_cache: rel_l1_thresh, ret_steps, "
        "coefficients; mag_cache: magcache_thresh, magcache_K, retention_ratio, mag_ratios)."
    ),
]
CacheSummaryOpt = Annotated[
    bool, typer.Option("--enable-cache-dit-summary", help="Log each request's step-cache summary (skipped forwards).")
]


def _own_parameters(command: Callable[..., None], drop: str) -> tuple[inspect.Signature, list[inspect.Parameter]]:
    """The command's parameters but `drop`, with their annotations evaluated: under `from __future__
    import annotations` they are strings, and typer finds its Option/Argument metadata only in a
    real `Annotated` (a string would silently lose every help text and make an option an argument)."""
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
    return signature, [p for p in own if p.name != drop]


def request_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add one `--name` option per request field (params.FIELDS, the table the HTTP form is made
    from too) and hand the given ones to the command as `request`.

    Values are taken as text and validated by the one schema (params.resolve_params), so the CLI,
    HTTP and JSONL reject the same values with the same words.
    """
    signature, own = _own_parameters(command, "request")
    fields = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[str | None, typer.Option(help=f.help)],
        )
        for f in FIELDS
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        request = {f.name: kwargs.pop(f.name) for f in FIELDS if kwargs.get(f.name) is not None}
        for f in FIELDS:
            kwargs.pop(f.name, None)
        return command(request=request, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*own, *fields])  # type: ignore[attr-defined]
    return wrapper


@dataclass(frozen=True)
class RunFlags:
    """The flags every running command (generate, batch, serve) takes, as typed; one table
    (`RUN_OPTIONS`) makes the options, so the three commands cannot drift apart."""

    model: str
    config: str | None
    device: str
    load_format: str
    tp: int | None
    ulysses: int
    cfg_parallel: bool
    max_width: int
    max_height: int
    max_frames: int
    max_steps: int
    max_fps: int
    max_prompt_chars: int
    max_work: int
    max_image_pixels: int
    job_deadline: float
    collective_timeout: float
    heartbeat_timeout: float
    stop_grace: float
    load_timeout: float
    compile: bool | None
    warmup_shapes: str | None
    compile_cache: str | None
    vae_dtype: str
    gpu_memory: str
    offload: str
    prompt_cache: int
    condition_cache: int
    vae_encode_reuse: bool
    lora: list[str] | None
    lora_high: list[str] | None
    lora_low: list[str] | None
    cache_backend: str
    cache_config: str | None
    enable_cache_dit_summary: bool


RUN_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("model", ModelOpt, "tiny"),
    ("config", ConfigOpt, None),
    ("device", DeviceOpt, "auto"),
    ("load_format", LoadFormatOpt, "auto"),
    ("tp", TpOpt, None),
    ("ulysses", UlyssesOpt, 1),
    ("cfg_parallel", CfgParallelOpt, False),
    ("max_width", MaxWidthOpt, Limits.max_width),
    ("max_height", MaxHeightOpt, Limits.max_height),
    ("max_frames", MaxFramesOpt, Limits.max_frames),
    ("max_steps", MaxStepsOpt, Limits.max_steps),
    ("max_fps", MaxFpsOpt, Limits.max_fps),
    ("max_prompt_chars", MaxPromptCharsOpt, Limits.max_prompt_chars),
    ("max_work", MaxWorkOpt, Limits.max_work),
    ("max_image_pixels", MaxImagePixelsOpt, Limits.max_image_pixels),
    ("job_deadline", JobDeadlineOpt, Limits.deadline_s_at_max_work),
    ("collective_timeout", CollectiveTimeoutOpt, 600.0),
    ("heartbeat_timeout", HeartbeatTimeoutOpt, 60.0),
    ("stop_grace", StopGraceOpt, 15.0),
    ("load_timeout", LoadTimeoutOpt, 1800.0),
    ("compile", CompileOpt, None),
    ("warmup_shapes", WarmupOpt, None),
    ("compile_cache", CompileCacheOpt, None),
    ("vae_dtype", VaeDtypeOpt, "fp32"),
    ("gpu_memory", GpuMemoryOpt, "auto"),
    ("offload", OffloadOpt, "auto"),
    ("prompt_cache", PromptCacheOpt, 16),
    ("condition_cache", ConditionCacheOpt, 8),
    ("vae_encode_reuse", VaeEncodeReuseOpt, True),
    ("lora", LoraOpt, None),
    ("lora_high", LoraHighOpt, None),
    ("lora_low", LoraLowOpt, None),
    ("cache_backend", CacheBackendOpt, "none"),
    ("cache_config", CacheConfigOpt, None),
    ("enable_cache_dit_summary", CacheSummaryOpt, False),
)


def run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add `RUN_OPTIONS` to a command and hand them to it as one `run: RunFlags`."""
    signature, own = _own_parameters(command, "run")
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in RUN_OPTIONS
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        run = RunFlags(**{name: kwargs.pop(name) for name, _, _ in RUN_OPTIONS})
        return command(run=run, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
    return wrapper


def _limits(run: RunFlags, max_upload_bytes: int = Limits.max_upload_bytes) -> Limits:
    for flag, value in (
        ("--max-upload-bytes", max_upload_bytes),
        ("--max-prompt-chars", run.max_prompt_chars),
        ("--max-work", run.max_work),
        ("--max-image-pixels", run.max_image_pixels),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 0 < run.job_deadline < float("inf"):
        raise ValueError(f"--job-deadline must be > 0 seconds, got {run.job_deadline}")
    return Limits(
        max_width=run.max_width,
        max_height=run.max_height,
        max_frames=run.max_frames,
        max_steps=run.max_steps,
        max_fps=run.max_fps,
        max_upload_bytes=max_upload_bytes,
        max_image_pixels=run.max_image_pixels,
        max_prompt_chars=run.max_prompt_chars,
        max_work=run.max_work,
        deadline_s_at_max_work=run.job_deadline,
    )


def _model(run: RunFlags) -> tuple[ModelInfo, ParallelLayout]:
    """The model's facts and the parallel layout, refused before torch loads if the world's ranks
    cannot split it."""
    _, world_size, _ = torchrun_env()
    info = resolve_model(run.model, run.load_format)
    layout = resolve_layout(world_size, tp=run.tp, ulysses=run.ulysses, cfg_parallel=run.cfg_parallel)
    check_layout(layout, info.transformer_config)
    check_family(layout, info.family)
    check_hosts(layout, env_int("LOCAL_WORLD_SIZE", world_size, low=1))
    return info, layout


def _engine_options(
    info: ModelInfo, layout: ParallelLayout, run: RunFlags, auto_warmup: tuple[WarmupShape | None, ...] = ()
) -> EngineOptions:
    from wan_spmd.engine import EngineOptions

    if run.vae_dtype not in VAE_DTYPES:
        raise ValueError(f"--vae-dtype must be one of {', '.join(VAE_DTYPES)}, got {run.vae_dtype!r}")
    for flag, entries in (("--prompt-cache", run.prompt_cache), ("--condition-cache", run.condition_cache)):
        if entries < 0:
            raise ValueError(f"{flag} must be >= 0 entries (0 disables it), got {entries}")
    shapes = None
    if run.warmup_shapes is not None:
        shapes = parse_warmup_shapes(run.warmup_shapes, info.spatial_multiple, run.max_frames)
    for flag, seconds in (
        ("--collective-timeout", run.collective_timeout),
        ("--heartbeat-timeout", run.heartbeat_timeout),
        ("--stop-grace", run.stop_grace),
        ("--load-timeout", run.load_timeout),
    ):
        if not seconds > 0:
            raise ValueError(f"{flag} must be > 0 seconds, got {seconds}")
    return EngineOptions(
        layout=layout,
        device=run.device,
        load_format=run.load_format,
        collective_timeout_s=run.collective_timeout,
        heartbeat_timeout_s=run.heartbeat_timeout,
        stop_grace_s=run.stop_grace,
        load_timeout_s=run.load_timeout,
        compile=run.compile,
        warmup_shapes=shapes,
        compile_cache=parse_compile_cache(run.compile_cache),
        auto_warmup_shapes=tuple(dict.fromkeys(shape for shape in auto_warmup if shape is not None)),
        vae_dtype=run.vae_dtype,
        prompt_cache=run.prompt_cache,
        condition_cache=run.condition_cache,
        vae_encode_reuse=run.vae_encode_reuse,
        loras=parse_lora_specs(info, lora=run.lora, lora_high=run.lora_high, lora_low=run.lora_low),
        cache=parse_cache_spec(run.cache_backend, run.cache_config, run.enable_cache_dit_summary),
        memory_plan=_memory_plan(info, layout, run),
    )


def _card_bytes(device: str) -> int | None:
    """This rank's GPU memory (torch loads here, after the other arguments passed); None on the CPU."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torchrun_env()[2] % torch.cuda.device_count()).total_memory


def _memory_plan(info: ModelInfo, layout: ParallelLayout, run: RunFlags):
    """The placement for --gpu-memory at the largest request planned for (the preset's shape within
    the --max-* limits), decided before anything loads: a budget nothing fits is refused here with
    the numbers. None on the CPU unless a budget or an offload was asked for."""
    from wan_spmd.memory import NO_BUDGET, Request, parse_gpu_memory, plan_for
    from wan_spmd.params import token_count

    card = _card_bytes(run.device)
    if card is None and run.gpu_memory == "auto" and run.offload == "auto":
        return None
    budget = NO_BUDGET if card is None and run.gpu_memory == "auto" else parse_gpu_memory(run.gpu_memory, card)
    shape = preset_warmup_shape(generation_defaults(info, run.config)) or (run.max_width, run.max_height, 81)
    width, height = min(shape[0], run.max_width), min(shape[1], run.max_height)
    frames = min(shape[2], run.max_frames)
    multiple = info.spatial_multiple
    width, height = max(width // multiple * multiple, multiple), max(height // multiple * multiple, multiple)
    tokens = min(token_count(info, width, height, frames), run.max_work)
    request = Request(width, height, frames, tokens, info.family.conditioning == "channel_concat")
    return plan_for(
        info,
        request,
        budget,
        tp=layout.tp,
        ulysses=layout.ulysses,
        world_size=layout.world_size,
        quant=getattr(run, "quant", None) or "none",  # --quant, where the fp8 linears are offered
        vae_dtype=run.vae_dtype,
        offload=run.offload,
        step_cache=run.cache_backend.strip().lower() != "none",
    )


def _note_tiny(model: str) -> None:
    """Say once, after the arguments passed, that `tiny` makes noise."""
    if torchrun_env()[0] == 0 and model.startswith("tiny"):
        print(f"note: {TINY_NOTE}", file=sys.stderr)


def _check_loras(info: ModelInfo, engine: EngineOptions) -> None:
    """Every key and shape of every LoRA against the architecture, on meta tensors (torch loads
    here, after the other arguments passed), so a bad file stops every rank with one line and exit
    2 before anything loads or listens."""
    if not engine.loras:
        return
    # Every rank checks the same files and fails alike, but not at the same moment (the check
    # imports torch and diffusers): torchrun SIGTERMs a slower rank as soon as the first exits,
    # which must still end as this check's exit 2, not a signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
    try:
        from wan_spmd.lora import check_loras

        with user_errors():
            check_loras(engine.loras, info.transformer_config, info.family.expert_names, warn=torchrun_env()[0] == 0)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(model: str, info: ModelInfo, engine: EngineOptions, make_front: Callable[[], Any]) -> int:
    """Every rank: the engine's lifecycle; rank 0's front from `make_front()`. torch loads here,
    after the arguments were checked."""
    _check_loras(info, engine)
    _note_tiny(model)
    from wan_spmd.prefetch import prefetch_weights

    prefetch_weights(info.path, engine.load_format)  # read ahead while torch imports
    front = make_front() if torchrun_env()[0] == 0 else None
    if front is not None:
        try:  # serve listens before torch is imported (seconds): /health says 503 meanwhile
            front.start()
        except ValueError:
            pass  # the engine's own call raises it again, once every rank has joined
    from wan_spmd.engine import run_engine

    with user_errors():
        return run_engine(info, engine, front)


@app.command()
@request_options
@run_options
def generate(
    request: dict[str, Any],
    run: RunFlags,
    image: Annotated[str | None, typer.Option(help="Input image path (image-to-video models).")] = None,
    output: Annotated[Path, typer.Option(help="Where the mp4 goes.")] = Path("output.mp4"),
    frames_dir: Annotated[Path | None, typer.Option(help="Also write every frame as a lossless PNG here.")] = None,
) -> None:
    """Generate one video and write it as an mp4."""
    with user_errors():
        info, layout = _model(run)
        limits = _limits(run)
        image_bytes = read_image_file(image, max_bytes=limits.max_upload_bytes) if image is not None else None
        params = resolve_params(
            request,
            info=info,
            defaults=generation_defaults(info, run.config),
            limits=limits,
            image=image_bytes,
            image_field="image",
        )
        if output.is_dir():
            raise ValueError(f"--output {output} is a folder; give a file name such as out.mp4")
        engine = _engine_options(info, layout, run, auto_warmup=((params.width, params.height, params.num_frames),))
    from wan_spmd.generate import GenerateFront
    from wan_spmd.jobs import Job

    job = Job("generate", params, frames_dir=str(frames_dir) if frames_dir is not None else None)
    code = _run(run.model, info, engine, lambda: GenerateFront(job, output))
    if code:
        raise CliExit("", code=code)


@app.command()
@run_options
def batch(
    requests: Annotated[
        Path,
        typer.Argument(
            help="JSONL file: one request per line (the HTTP form's keys, plus image = a path, id, output)."
        ),
    ],
    output_dir: Annotated[Path, typer.Option(help="Where the mp4s and results.jsonl go.")],
    run: RunFlags,
    # Text, so that `auto` gets through; check_args turns it into numbers (or a one-line error).
    shard_index: Annotated[
        str | None,
        typer.Option(
            metavar="I|auto",
            help="This run's shard, 0..num-shards-1, or auto: SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX.",
        ),
    ] = None,
    num_shards: Annotated[
        str | None,
        typer.Option(
            metavar="K|auto", help="Split the batch over this many runs by job id, or auto: SLURM_ARRAY_TASK_COUNT."
        ),
    ] = None,
) -> None:
    """Generate a video per JSONL line; rerun to resume, shard over many runs. Exit 1 if any line
    failed or the run was interrupted (SIGTERM/SIGINT: the line in flight is recorded, the rerun does it)."""
    from wan_spmd.batch import check_args, check_shared_outputs

    with user_errors():
        shard = check_args(requests, output_dir, shard_index, num_shards)
        check_shared_outputs(requests, shard)
        info, layout = _model(run)
        defaults = generation_defaults(info, run.config)
        limits = _limits(run)
        # the file's own warm-up shapes come from rank 0's front (it validates lines, reading images)
        engine = _engine_options(info, layout, run)
    # rank 0 alone reads the file
    from wan_spmd.batch import BatchFront, BatchSource

    fronts: list[BatchFront] = []

    def make_front() -> BatchFront:
        source = BatchSource(requests, output_dir, info=info, defaults=defaults, limits=limits, shard=shard)
        fronts.append(BatchFront(source))
        return fronts[0]

    code = _run(run.model, info, engine, make_front)
    for front in fronts:
        print(front.source.summary.line())
        print(f"results: {front.source.results_path}")
    if code:
        raise CliExit("", code=code)


@app.command()
@run_options
def serve(
    run: RunFlags,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one (logged).")] = 8000,
    uds: Annotated[str | None, typer.Option(help="Listen on this Unix socket instead of TCP.")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; more get 429.")] = 16,
    output_dir: Annotated[Path, typer.Option(help="Every finished video is also kept here.")] = Path("outputs"),
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="WAN_SPMD_API_KEY",
            help="Require Authorization: Bearer KEY (all but /health). Visible in ps: prefer --api-key-file.",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="Read the API key from this file (its first line), out of sight of ps.")
    ] = None,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option(
            help="Name in /v1/models (default: --model); give it again for more names (aliases) a request may use."
        ),
    ] = None,
    max_upload_bytes: Annotated[int, typer.Option(help="Largest image upload; 413 beyond.")] = Limits.max_upload_bytes,
    max_connections: Annotated[
        int, typer.Option(help="HTTP connections held at once; when full, the one idle longest is closed.")
    ] = HttpOptions.max_connections,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a connection may take to send a request's headers (then 408, closed).")
    ] = HttpOptions.header_timeout_s,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take to send its body after its headers (then 408, closed).")
    ] = HttpOptions.body_timeout_s,
    send_timeout: Annotated[
        float,
        typer.Option(help="Seconds an answer may go without the client taking a byte of it (then closed), as nginx's."),
    ] = HttpOptions.send_timeout_s,
    uds_mode: Annotated[
        str, typer.Option(help="Octal permissions of the --uds socket file, e.g. 660 to let a group connect.")
    ] = "600",
    sync_videos: Annotated[
        bool,
        typer.Option(
            help="POST /v1/videos from a plain client waits and answers the mp4 as base64 (vllm-omni's earlier API); "
            "the OpenAI SDK and `Prefer: respond-async` still get a queued job. Default: every client gets one."
        ),
    ] = False,
    async_videos: Annotated[
        bool, typer.Option(help="Deprecated, does nothing: POST /v1/videos is asynchronous by default.")
    ] = False,
    strict_sizes: Annotated[
        bool,
        typer.Option(
            help="A size not a multiple of the model's, or frames not 4k+1, is a 400 (default: rounded and reported)."
        ),
    ] = False,
    keep_jobs: Annotated[
        int, typer.Option(help="Finished video jobs kept (records and files); the oldest finished goes first.")
    ] = 1000,
    job_ttl: Annotated[
        float | None,
        typer.Option(help="Seconds a finished job's records and files are kept (its expires_at); default: no limit."),
    ] = None,
    replica_name: Annotated[
        str | None,
        typer.Option(
            help="Put in every job id (video_NAME_...) so a balancer can route polls; default: the host name. "
            "Replicas sharing --output-dir need different names."
        ),
    ] = None,
    job_lease: Annotated[
        float,
        typer.Option(
            help="Replicas sharing --output-dir: seconds without renewing its lease after which a replica is "
            "taken for dead and the others fail its unfinished jobs."
        ),
    ] = 60.0,
) -> None:
    """Serve the model over HTTP (rank 0 answers; every rank runs each job)."""
    rank, world_size, _ = torchrun_env()
    with user_errors():
        from wan_spmd.server.app import ServerSettings
        from wan_spmd.server.videos import check_replica_name, default_replica_name

        api_key = _api_key(api_key, api_key_file)
        if async_videos and rank == 0:
            print(
                "warning: --async-videos is deprecated and does nothing: POST /v1/videos is asynchronous by default "
                "(--sync-videos restores the synchronous answer)",
                file=sys.stderr,
            )
        http = _http_options(max_connections, header_timeout, body_timeout, send_timeout, uds_mode)
        if uds is not None:
            _check_uds_free(Path(uds).expanduser())
        info, layout = _model(run)
        if max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {max_queue}")
        if uds is None and not 0 <= port <= 65535:
            raise ValueError(f"--port must be within 0..65535, got {port}")
        if output_dir.exists() and not output_dir.is_dir():
            raise ValueError(f"--output-dir {output_dir} is a file, not a folder")
        if keep_jobs < 1:
            raise ValueError(f"--keep-jobs must be >= 1, got {keep_jobs}")
        if job_ttl is not None and not job_ttl > 0:
            raise ValueError(f"--job-ttl must be a positive number of seconds, got {job_ttl:g}")
        replica_name = check_replica_name(replica_name) if replica_name is not None else default_replica_name()
        if not job_lease > 0:
            raise ValueError(f"--job-lease must be a positive number of seconds, got {job_lease:g}")
        defaults = generation_defaults(info, run.config)
        engine = _engine_options(info, layout, run, auto_warmup=(preset_warmup_shape(defaults),))
        limits = _limits(run, max_upload_bytes)
        settings = ServerSettings(
            info=info,
            defaults=defaults,
            served_model_name=(served_model_name or [run.model])[0],
            model_aliases=tuple(served_model_name or ())[1:],
            limits=limits,
            api_key=api_key,
            world_size=world_size,
            loras=tuple(spec.card() for spec in engine.loras),
            sync_videos=sync_videos,
            strict_sizes=strict_sizes,
        )
        from wan_spmd.serve import ServeFront, ServeOptions

        options = ServeOptions(
            host=host,
            port=port,
            uds=str(Path(uds).expanduser()) if uds else None,
            max_queue=max_queue,
            output_dir=output_dir,
            http=http,
            replica_name=replica_name,
            keep_jobs=keep_jobs,
            job_ttl_s=job_ttl,
            job_lease_s=job_lease,
        )
    code = _run(run.model, info, engine, lambda: ServeFront(settings, options))
    # main() ends the rank with finish_process, skipping interpreter finalisation under torchrun
    if code:
        raise CliExit("", code=code)


def _api_key(flag: str | None, key_file: Path | None) -> str | None:
    """The one API key from --api-key, WAN_SPMD_API_KEY or --api-key-file; an empty one is refused,
    never read as "no key" (that would serve everyone)."""
    if flag is None and os.environ.get("WAN_SPMD_API_KEY") is not None:  # click reads an empty variable as unset
        flag = os.environ["WAN_SPMD_API_KEY"]
    if key_file is not None:
        if flag is not None:
            raise ValueError("give the API key once: --api-key (or WAN_SPMD_API_KEY) or --api-key-file")
        try:
            lines = key_file.expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ValueError(f"--api-key-file {key_file}: cannot read it ({reason})") from None
        key, where = (lines[0] if lines else "").strip(), f"--api-key-file {key_file}"
    elif flag is not None:
        key, where = flag.strip(), "--api-key / WAN_SPMD_API_KEY"
    else:
        return None
    if not key:
        raise ValueError(f"{where} gives an empty API key; give a real key, or none to serve without one")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError(f"{where}: the API key must be one word of printable characters (no spaces)")
    return key


def _http_options(
    max_connections: int, header_timeout: float, body_timeout: float, send_timeout: float, uds_mode: str
) -> HttpOptions:
    if max_connections < 1:
        raise ValueError(f"--max-connections must be >= 1, got {max_connections}")
    timeouts = {"--header-timeout": header_timeout, "--body-timeout": body_timeout, "--send-timeout": send_timeout}
    for flag, seconds in timeouts.items():
        if not seconds > 0:
            raise ValueError(f"{flag} must be > 0 seconds, got {seconds}")
    try:
        mode = int(uds_mode, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or not mode & 0o600 == 0o600:
        raise ValueError(
            f"--uds-mode must be octal permissions that let the owner read and write (e.g. 600), got {uds_mode}"
        )
    return HttpOptions(max_connections, header_timeout, body_timeout, send_timeout_s=send_timeout, uds_mode=mode)


def _check_uds_free(path: Path) -> None:
    """Refuse a --uds path that is not a socket, or a socket another server answers on."""
    from wan_spmd.server.http import socket_in_use

    if not path.parent.is_dir():
        raise ValueError(f"--uds {path}: folder {path.parent} does not exist")
    if path.is_symlink() or (path.exists() and not path.is_socket()):
        raise ValueError(f"--uds {path} exists and is not a socket; refusing to replace it")
    if path.exists() and (live := socket_in_use(str(path))):
        raise ValueError(f"--uds {path}: {live}; refusing to take it over")


@app.command("make-tiny")
def make_tiny_cmd(
    dest: Annotated[Path, typer.Argument(help="Folder to write.")],
    variant: Annotated[str, typer.Option(help="i2v, t2v or ti2v.")] = "i2v",
) -> None:
    """Write a tiny random Wan2.2 checkpoint in the real diffusers layout (noise, not art). The folder
    must be new, empty, or a tiny checkpoint already (which is overwritten)."""
    from wan_spmd.config import is_tiny_folder

    if dest.exists() and not dest.is_dir():
        raise CliExit(f"error: {dest} is a file, not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not is_tiny_folder(dest):
        raise CliExit(f"error: {dest} is not empty and holds no tiny checkpoint; give a new or empty folder")
    from wan_spmd.tiny import VARIANTS, make_tiny

    if variant not in VARIANTS:
        raise CliExit(f"error: --variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    make_tiny(dest, variant)
    print(f"wrote a tiny random {variant} checkpoint to {dest} (it makes noise, not art)")


def _exit_together(rank: int, code: int) -> None:
    """Every rank sees the same bad argument, and torchrun stops the others as soon as one exits.
    Rank 0 (which prints the line) waits 3 s so its peers get this far; a peer stopped by
    torchrun while waiting still exits with the same code. Peers wait for rank 0 to exit first
    (bounded): a check that imports torch (the LoRA files') can reach rank 0 seconds later on a
    busy host, and torchrun would otherwise stop rank 0 before it printed the line."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    time.sleep(3.0 if rank == 0 else 30.0)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and exit 2 for bad usage, printed once under torchrun."""
    try:
        rank, world_size, _ = torchrun_env()
    except ValueError as exc:  # torchrun sets these; a hand-set one can be anything
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(rank)
    try:
        app(args=argv, standalone_mode=False)
    except CliExit as exc:
        if str(exc) and rank == 0:
            print(str(exc), file=sys.stderr)
        if exc.code == 2 and world_size > 1:
            _exit_together(rank, exc.code)
        finish_process(exc.code)
    except Exception as exc:
        # click's (typer-vendored) usage errors: unknown option, missing value, bad choice
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message(), file=sys.stderr)
            sys.exit(2)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            if rank == 0:
                print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        raise
    finish_process(0)
