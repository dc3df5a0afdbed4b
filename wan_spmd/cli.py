"""The `wan_spmd` command line: generate, make-tiny, serve, batch.

Every command runs the same way alone or under `torchrun --nproc-per-node N -m wan_spmd ...`.
Arguments are checked on every rank before the process group starts; a bad one exits 2 with one
line (printed by rank 0 only) and no traceback.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wan_spmd import options
from wan_spmd.compile_cache import parse_compile_cache
from wan_spmd.config import TINY_NAMES, TINY_NOTE, ModelFolderError, ModelInfo, generation_defaults
from wan_spmd.launch import (
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
from wan_spmd.params import Limits, RequestError, read_image_file, resolve_params
from wan_spmd.process import env_int, finish_process, setup_logging, torchrun_env

if TYPE_CHECKING:
    from wan_spmd.engine import EngineOptions

TINY_VARIANTS = tuple(dict.fromkeys(TINY_NAMES.values()))

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
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


# -- the commands' options, made from options.OPTIONS ---------------------------------------------
def _escape(text: str) -> str:
    """Help text as typer's rich help prints it: `[` opening what rich would read as a style tag
    (rich.markup.escape's rule) is escaped, so "[0, 1]" or "[x]" is printed, not dropped."""
    return re.sub(r"(\\*)(\[[a-z#/@][^[]*?])", r"\1\1\\\2", text)


def _typer_parameter(o: options.Option) -> inspect.Parameter:
    """One option as typer reads it. Values other than on/off flags and repeatable ones are taken
    as text and parsed by options.parse (one line naming the flag for a bad one); the default is
    handed to typer as the text help shows."""
    if o.argument:
        info: Any = typer.Argument(help=_escape(o.help), show_default=False)
        # typer shows an argument's type as <type>: a Path is `<path>`, not `<str>`
        annotation = Path if o.type is Path else str
        return inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[annotation, info])
    decls = [f"{o.flag}/--no-{o.flag[2:]}"] if o.type is bool else []
    info = typer.Option(
        *decls,
        help=_escape(o.help),
        rich_help_panel=o.panel,
        metavar="" if o.type is bool else o.shown_type,
        show_default=o.default_text if o.default_text is not None else True,
        envvar=o.envvar,
    )
    annotation = {bool: bool | None, list: list[str] | None}.get(o.type, str | None)
    if o.required:
        return inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[annotation, info])
    shown = o.default if o.default is None or o.type in (bool, list) else _default_text(o.default)
    return inspect.Parameter(
        o.name, inspect.Parameter.KEYWORD_ONLY, default=shown, annotation=Annotated[annotation, info]
    )


def _default_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def command(name: str) -> Callable[[Callable[[options.Values], None]], Callable[[options.Values], None]]:
    """Register `run(values)` as the typer command `name`, its options the table's rows for it."""

    def register(run: Callable[[options.Values], None]) -> Callable[[options.Values], None]:
        def callback(**given: Any) -> None:
            if torchrun_env()[0] == 0:
                for warning in options.deprecations(name, given):
                    print(f"warning: {warning}", file=sys.stderr)
            with user_errors():
                values = options.parse(name, given)
            run(values)

        callback.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [_typer_parameter(o) for o in options.options_of(name)]
        )
        # one paragraph: rich help would keep the docstring's line breaks
        app.command(name, help=" ".join((run.__doc__ or "").split()))(callback)
        return run

    return register


def _model(values: options.Values) -> tuple[ModelInfo, ParallelLayout]:
    """The model's facts and the parallel layout, refused before torch loads if the world's ranks
    cannot split it."""
    _, world_size, _ = torchrun_env()
    info = resolve_model(values.model, values.load_format)
    layout = resolve_layout(world_size, tp=values.tp, ulysses=values.ulysses, cfg_parallel=values.cfg_parallel)
    check_layout(layout, info.transformer_config)
    check_family(layout, info.family)
    check_hosts(layout, env_int("LOCAL_WORLD_SIZE", world_size, low=1))
    return info, layout


def _engine_options(
    info: ModelInfo, layout: ParallelLayout, values: options.Values, auto_warmup: tuple[WarmupShape | None, ...] = ()
) -> EngineOptions:
    """The engine's options: the flags that feed it, plus what is checked against the model here
    (warm-up shapes, LoRA files), before the engine (and torch) is imported."""
    shapes = None
    if values.warmup_shapes is not None:
        shapes = parse_warmup_shapes(values.warmup_shapes, info.spatial_multiple, values.max_frames)
    loras = parse_lora_specs(info, lora=values.lora, lora_high=values.lora_high, lora_low=values.lora_low)
    from wan_spmd.engine import EngineOptions

    return values.into(
        EngineOptions,
        "engine",
        layout=layout,
        warmup_shapes=shapes,
        compile_cache=parse_compile_cache(values.compile_cache),
        auto_warmup_shapes=tuple(dict.fromkeys(shape for shape in auto_warmup if shape is not None)),
        loras=loras,
        cache=parse_cache_spec(values.cache_backend, values.cache_config, values.enable_cache_dit_summary),
        memory_plan=_memory_plan(info, layout, values),
    )


def _card_bytes(device: str) -> int | None:
    """This rank's GPU memory (torch loads here, after the other arguments passed); None on the CPU."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torchrun_env()[2] % torch.cuda.device_count()).total_memory


def _memory_plan(info: ModelInfo, layout: ParallelLayout, values: options.Values):
    """The placement for --gpu-memory at the largest request planned for (the preset's shape within
    the --max-* limits), decided before anything loads: a budget nothing fits is refused here with
    the numbers. None on the CPU unless a budget or an offload was asked for."""
    from wan_spmd.memory import NO_BUDGET, Request, parse_gpu_memory, plan_for
    from wan_spmd.params import token_count

    card = _card_bytes(values.device)
    if card is None and values.gpu_memory == "auto" and values.offload == "auto":
        return None
    budget = NO_BUDGET if card is None and values.gpu_memory == "auto" else parse_gpu_memory(values.gpu_memory, card)
    shape = preset_warmup_shape(generation_defaults(info, values.config)) or (values.max_width, values.max_height, 81)
    width, height = min(shape[0], values.max_width), min(shape[1], values.max_height)
    frames = min(shape[2], values.max_frames)
    multiple = info.spatial_multiple
    width, height = max(width // multiple * multiple, multiple), max(height // multiple * multiple, multiple)
    tokens = min(token_count(info, width, height, frames), values.max_work)
    request = Request(width, height, frames, tokens, info.family.conditioning == "channel_concat")
    return plan_for(
        info,
        request,
        budget,
        tp=layout.tp,
        ulysses=layout.ulysses,
        world_size=layout.world_size,
        quant=values.quant,
        vae_dtype=values.vae_dtype,
        offload=values.offload,
        step_cache=values.cache_backend.strip().lower() != "none",
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


@command(options.GENERATE)
def generate(values: options.Values) -> None:
    """Generate one video and write it as an mp4."""
    with user_errors():
        info, layout = _model(values)
        limits = values.into(Limits, "limits")
        image = read_image_file(values.image, max_bytes=limits.max_upload_bytes) if values.image is not None else None
        params = resolve_params(
            values.request,
            info=info,
            defaults=generation_defaults(info, values.config),
            limits=limits,
            image=image,
            image_field="image",
        )
        if values.output.is_dir():
            raise ValueError(f"--output {values.output} is a folder; give a file name such as out.mp4")
        engine = _engine_options(info, layout, values, auto_warmup=((params.width, params.height, params.num_frames),))
    from wan_spmd.generate import GenerateFront
    from wan_spmd.jobs import Job

    frames_dir = str(values.frames_dir) if values.frames_dir is not None else None
    job = Job("generate", params, frames_dir=frames_dir)
    code = _run(values.model, info, engine, lambda: GenerateFront(job, values.output))
    if code:
        raise CliExit("", code=code)


@command(options.BATCH)
def batch(values: options.Values) -> None:
    """Generate a video per JSONL line; rerun to resume, shard over many runs. Exit 1 if any line
    failed or the run was interrupted (SIGTERM/SIGINT: the line in flight is recorded, the rerun does it)."""
    from wan_spmd.batch import check_args, check_shared_outputs

    requests, output_dir = values.requests, values.output_dir
    with user_errors():
        shard = check_args(requests, output_dir, values.shard_index, values.num_shards)
        check_shared_outputs(requests, shard)
        info, layout = _model(values)
        defaults = generation_defaults(info, values.config)
        limits = values.into(Limits, "limits")
        # the file's own warm-up shapes come from rank 0's front (it validates lines, reading images)
        engine = _engine_options(info, layout, values)
    # rank 0 alone reads the file
    from wan_spmd.batch import BatchFront, BatchSource

    fronts: list[BatchFront] = []

    def make_front() -> BatchFront:
        source = BatchSource(requests, output_dir, info=info, defaults=defaults, limits=limits, shard=shard)
        fronts.append(BatchFront(source))
        return fronts[0]

    code = _run(values.model, info, engine, make_front)
    for front in fronts:
        print(front.source.summary.line())
        print(f"results: {front.source.results_path}")
    if code:
        raise CliExit("", code=code)


@command(options.SERVE)
def serve(values: options.Values) -> None:
    """Serve the model over HTTP (rank 0 answers; every rank runs each job)."""
    _, world_size, _ = torchrun_env()
    with user_errors():
        from wan_spmd.server.app import ServerSettings
        from wan_spmd.server.options import HttpOptions
        from wan_spmd.server.videos import check_replica_name, default_replica_name

        api_key = _api_key(values.api_key, values.api_key_file)
        uds = str(Path(values.uds).expanduser()) if values.uds else None
        if uds is not None:
            _check_uds_free(Path(uds))
        info, layout = _model(values)
        if values.output_dir.exists() and not values.output_dir.is_dir():
            raise ValueError(f"--output-dir {values.output_dir} is a file, not a folder")
        replica = values.replica_name
        replica = check_replica_name(replica) if replica is not None else default_replica_name()
        defaults = generation_defaults(info, values.config)
        engine = _engine_options(info, layout, values, auto_warmup=(preset_warmup_shape(defaults),))
        settings = ServerSettings(
            info=info,
            defaults=defaults,
            served_model_name=(values.served_model_name or [values.model])[0],
            model_aliases=tuple(values.served_model_name or ())[1:],
            limits=values.into(Limits, "limits"),
            api_key=api_key,
            world_size=world_size,
            loras=tuple(spec.card() for spec in engine.loras),
            sync_videos=values.sync_videos,
            strict_sizes=values.strict_sizes,
        )
        from wan_spmd.serve import ServeFront, ServeOptions

        serve_options = values.into(
            ServeOptions, "serve", uds=uds, http=values.into(HttpOptions, "http"), replica_name=replica
        )
    code = _run(values.model, info, engine, lambda: ServeFront(settings, serve_options))
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
    variant: Annotated[str, typer.Option(help="The model family.", metavar="|".join(TINY_VARIANTS))] = "i2v",
) -> None:
    """Write a tiny random Wan2.2 checkpoint in the real diffusers layout (noise, not art). The folder
    must be new, empty, or a tiny checkpoint already (which is overwritten)."""
    from wan_spmd.config import is_tiny_folder

    if dest.exists() and not dest.is_dir():
        raise CliExit(f"error: {dest} is a file, not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not is_tiny_folder(dest):
        raise CliExit(f"error: {dest} is not empty and holds no tiny checkpoint; give a new or empty folder")
    if variant not in TINY_VARIANTS:  # before tiny.py imports torch
        raise CliExit(f"error: --variant must be one of {', '.join(TINY_VARIANTS)}, got {variant!r}")
    from wan_spmd.tiny import make_tiny

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
        if type(exc).__name__ == "NoSuchOption" and exc.ctx is not None and exc.ctx.info_name in options.RUN:
            # click's guesses are near spellings, sorted (--steps -> --fps, --max-steps, --tp)
            if rank == 0:
                guesses = options.suggest(exc.ctx.info_name, exc.option_name)
                hint = f" (did you mean {' or '.join(guesses)}?)" if guesses else ""
                print(f"error: No such option: {exc.option_name}{hint}", file=sys.stderr)
            sys.exit(2)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            if rank == 0:
                print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        raise
    finish_process(0)
