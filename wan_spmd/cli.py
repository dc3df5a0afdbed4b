"""The `wan_spmd` command line: generate, make-tiny, serve, batch.

Every command runs the same way alone or under `torchrun --nproc-per-node N -m wan_spmd ...`.
Arguments are checked on every rank before the process group starts; a bad one exits 2 with one
line (printed by rank 0 only) and no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from wan_spmd.config import TINY_NOTE, ModelFolderError, check_tp, generation_defaults, resolve_model
from wan_spmd.env import setup_logging, torchrun_env
from wan_spmd.params import Limits, RequestError, read_image_file, resolve_params

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

# Schema flags are taken as text and validated by the one schema (params.resolve_params), so the
# CLI, HTTP and JSONL reject the same values with the same words.
Text = Annotated[str | None, typer.Option()]


def _request(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _limits(max_width: int, max_height: int, max_frames: int, max_steps: int) -> Limits:
    return Limits(max_width=max_width, max_height=max_height, max_frames=max_frames, max_steps=max_steps)


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Option(help="What the video shows.")] = None,
    image: Annotated[str | None, typer.Option(help="Input image path (image-to-video models).")] = None,
    model: ModelOpt = "tiny",
    output: Annotated[Path, typer.Option(help="Where the mp4 goes.")] = Path("output.mp4"),
    frames_dir: Annotated[Path | None, typer.Option(help="Also write every frame as a lossless PNG here.")] = None,
    negative_prompt: Text = None,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT, multiples of 16.")] = None,
    width: Text = None,
    height: Text = None,
    seconds: Annotated[str | None, typer.Option(help="Duration; frames = seconds x fps rounded to 4k+1.")] = None,
    fps: Text = None,
    num_frames: Annotated[str | None, typer.Option(help="4k+1 frames; wins over --seconds.")] = None,
    num_inference_steps: Text = None,
    guidance_scale: Annotated[str | None, typer.Option(help="High-noise expert's CFG scale.")] = None,
    guidance_scale_2: Annotated[str | None, typer.Option(help="Low-noise expert's CFG scale.")] = None,
    boundary_ratio: Text = None,
    flow_shift: Text = None,
    seed: Text = None,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    max_width: MaxWidthOpt = Limits.max_width,
    max_height: MaxHeightOpt = Limits.max_height,
    max_frames: MaxFramesOpt = Limits.max_frames,
    max_steps: MaxStepsOpt = Limits.max_steps,
) -> None:
    """Generate one video and write it as an mp4."""
    rank, world_size, _ = torchrun_env()
    with user_errors():
        info = resolve_model(model)
        check_tp(info.transformer_config, world_size)
        request = _request(
            prompt=prompt,
            negative_prompt=negative_prompt,
            size=size,
            width=width,
            height=height,
            seconds=seconds,
            fps=fps,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_scale_2=guidance_scale_2,
            boundary_ratio=boundary_ratio,
            flow_shift=flow_shift,
            seed=seed,
        )
        image_bytes = read_image_file(image) if image is not None else None
        params = resolve_params(
            request,
            info=info,
            defaults=generation_defaults(info, config),
            limits=_limits(max_width, max_height, max_frames, max_steps),
            image=image_bytes,
            image_field="image",
        )
        if output.is_dir():
            raise ValueError(f"--output {output} is a folder; give a file name such as out.mp4")
        # torch loads only once the arguments are known to be good
        from wan_spmd.generate import OneJobSource
        from wan_spmd.runtime import Job, init_dist, load_pipeline, pipeline_runner, shutdown, spmd_loop

        d = init_dist(device)
    if rank == 0 and model.startswith("tiny"):
        print(f"note: {TINY_NOTE}", file=sys.stderr)
    try:
        pipe = load_pipeline(d, info)
        source = OneJobSource(Job("generate", params), output, frames_dir) if d.is_main else None
        spmd_loop(d, pipeline_runner(pipe), source)
    finally:
        shutdown(d)
    if d.is_main and (source.outcome is None or not source.outcome.ok):
        raise CliExit("", code=1)


@app.command("make-tiny")
def make_tiny_cmd(
    dest: Annotated[Path, typer.Argument(help="Folder to write.")],
    variant: Annotated[str, typer.Option(help="i2v or t2v.")] = "i2v",
) -> None:
    """Write a tiny random Wan2.2 checkpoint in the real diffusers layout (noise, not art)."""
    from wan_spmd.models import make_tiny

    if variant not in ("i2v", "t2v"):
        raise CliExit(f"error: --variant must be i2v or t2v, got {variant!r}")
    make_tiny(dest, variant)
    print(f"wrote a tiny random {variant} checkpoint to {dest} (it makes noise, not art)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and exit 2 for bad usage, printed once under torchrun."""
    rank, _, _ = torchrun_env()
    setup_logging(rank)
    try:
        app(args=argv, standalone_mode=False)
    except CliExit as exc:
        if str(exc) and rank == 0:
            print(str(exc), file=sys.stderr)
        sys.exit(exc.code)
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
