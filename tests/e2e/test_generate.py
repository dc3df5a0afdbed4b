"""`wan_spmd generate` as a user runs it: the README's first command, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import EXAMPLE_IMAGE, run_cli
from wan_spmd.video import probe_mp4


def test_readme_generate_writes_a_checked_mp4(cache_home, tmp_path):
    """The README's first command on the tiny model: an mp4 with the derived size, frames and fps."""
    out = tmp_path / "out.mp4"
    proc = run_cli(
        [
            "generate",
            "--prompt",
            "a red kite over a green hill",
            "--image",
            str(EXAMPLE_IMAGE),
            "--output",
            str(out),
            "--frames-dir",
            str(tmp_path / "frames"),
            "--seed",
            "3",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    meta = probe_mp4(out)
    # example.png is 320x192 (5:3); within the tiny model's 64x64 area that is 80x48
    assert (meta["num_frames"], meta["width"], meta["height"], meta["fps"]) == (9, 80, 48, 8)
    assert meta["codec"].startswith("h264")
    pngs = sorted((tmp_path / "frames").glob("*.png"))
    assert len(pngs) == 9 and Image.open(pngs[0]).size == (80, 48)
    assert np.asarray(Image.open(pngs[4])).std() > 1  # a real decoded frame, not a blank
    assert f"wrote {out}" in proc.stdout and "PipelineWall=" in proc.stdout and "Denoising=" in proc.stdout
    assert "noise, not art" in proc.stderr


def test_same_seed_same_frames(cache_home, tmp_path):
    """A seed fixes the video: two runs give identical lossless frames (t2v path)."""
    frames = []
    for i in range(2):
        proc = run_cli(
            [
                "generate",
                "--model",
                "tiny-t2v",
                "--prompt",
                "waves",
                "--seed",
                "11",
                "--size",
                "32x32",
                "--num-frames",
                "5",
                "--output",
                str(tmp_path / f"{i}.mp4"),
                "--frames-dir",
                str(tmp_path / f"f{i}"),
            ]
        )
        assert proc.returncode == 0, proc.stderr
        frames.append(np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / f"f{i}").glob("*.png"))]))
    assert frames[0].shape == (5, 32, 32, 3) and np.array_equal(frames[0], frames[1])


BAD = {
    "frames not 4k+1": (["--num-frames", "8"], "num_frames 8 must be 4k+1"),
    "size not multiple of 16": (["--size", "100x64"], "multiple of 16"),
    "size over limit": (["--size", "4096x64"], "over the limit 1920"),
    "malformed size": (["--size", "big"], "WIDTHxHEIGHT"),
    "steps out of range": (["--num-inference-steps", "500"], "between 1 and 200"),
    "negative guidance": (["--guidance-scale", "-2"], "guidance_scale must be >= 0"),
    "nan guidance": (["--guidance-scale-2", "nan"], "finite"),
    "boundary outside": (["--boundary-ratio", "1.2"], "boundary_ratio must be within [0, 1]"),
    "missing image file": (["--image", "/no/such.png"], "cannot read image"),
    "not an image": (["--image", "pyproject.toml"], "not a readable image"),
    "i2v without image": (["--image", ""], "send an input image"),
    "not a wan folder": (["--model", "configs"], "model_index.json is missing"),
    "unknown option": (["--colour", "red"], "No such option"),
    "warm-up shape not WxHxF": (["--warmup-shapes", "832x480"], "is not WIDTHxHEIGHTxFRAMES"),
    "warm-up frames not 4k+1": (["--warmup-shapes", "64x64x9,64x64x8"], "8 frames in '64x64x8' is not 4k+1"),
    "warm-up size not a multiple": (["--warmup-shapes", "60x64x9"], "width 60 in '60x64x9' is not a multiple of 16"),
    "bad vae dtype": (["--vae-dtype", "fp16"], "--vae-dtype must be one of fp32, bf16"),
    "negative prompt cache": (["--prompt-cache", "-1"], "--prompt-cache must be >= 0 entries"),
    "negative condition cache": (["--condition-cache", "-2"], "--condition-cache must be >= 0 entries"),
    "tp not the world": (["--tp", "2"], "cfg=1 x ulysses=1 x tp=2 = 2 ranks, but the world size is 1"),
    "gpu memory not a number": (["--gpu-memory", "lots"], "--gpu-memory must be GiB per card"),
    "gpu memory fraction without a gpu": (["--gpu-memory", "0.5"], "there is no GPU here"),
    "gpu memory too small": (["--gpu-memory", "1.5"], "--gpu-memory 1.5 GiB per card is too small for 64x64x9"),
    "unknown offload": (["--offload", "disk"], "--offload must be one of auto, none, text-encoder, experts"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(case, cache_home, tiny_i2v):
    """Each bad input: exit 2, exactly one line on stderr naming the problem, no traceback, no video."""
    extra, message = BAD[case]
    args = ["generate", "--prompt", "x", "--image", str(EXAMPLE_IMAGE), "--output", "/tmp/never.mp4", *extra]
    if "" in extra:  # drop --image entirely
        args = [a for a in args if a not in ("--image", str(EXAMPLE_IMAGE), "")]
    proc = run_cli(args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("with_image", [False, True])
def test_generate_ti2v_with_and_without_an_image(cache_home, tiny_ti2v, tmp_path, with_image):
    """`--model tiny-ti2v` is text-to-video without `--image` (the tiny preset's 64x64) and
    image-to-video with one (an explicit 96x32 the 320x192 image is resized to): if this fails, the
    one-expert, first-frame family does not run end to end through the CLI."""
    out = tmp_path / "out.mp4"
    args = ["generate", "--model", "tiny-ti2v", "--prompt", "a kite", "--seed", "2", "--num-frames", "5"]
    args += ["--output", str(out), "--frames-dir", str(tmp_path / "frames")]
    if with_image:
        args += ["--image", str(EXAMPLE_IMAGE), "--size", "96x32"]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr
    size = (96, 32) if with_image else (64, 64)
    meta = probe_mp4(out)
    assert (meta["num_frames"], meta["width"], meta["height"], meta["fps"]) == (5, *size, 8)
    pngs = sorted((tmp_path / "frames").glob("*.png"))
    assert len(pngs) == 5 and np.asarray(Image.open(pngs[-1])).std() > 1


@pytest.mark.parametrize(
    "extra, message",
    [(["--size", "48x48"], "width 48 must be a positive multiple of 32"), (["--num-frames", "6"], "must be 4k+1")],
)
def test_ti2v_bad_size_or_frames_exit_2_with_one_line(cache_home, tiny_ti2v, extra, message):
    """TI2V needs multiples of 32 (48 is fine for A14B) and 4k+1 frames: exit 2, one line, no traceback."""
    proc = run_cli(["generate", "--model", "tiny-ti2v", "--prompt", "x", "--output", "/tmp/never.mp4", *extra])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_make_tiny_refuses_a_folder_holding_other_files(tiny_i2v, tmp_path):
    """`make-tiny` into a folder with other files (or onto a file) exits 2 with one line and leaves
    them as they were; into a tiny checkpoint it writes again. If this fails, a mistyped path
    silently mixes random weights into a real model folder."""
    import shutil

    precious = tmp_path / "weights"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    for dest in (precious, precious / "notes.txt"):
        proc = run_cli(["make-tiny", str(dest)])
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "error:" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and (precious / "notes.txt").read_text() == "mine"
    again = tmp_path / "tiny"
    shutil.copytree(tiny_i2v, again)
    proc = run_cli(["make-tiny", str(again)])
    assert proc.returncode == 0, proc.stderr


def test_generate_with_experts_offloaded_logs_the_plan(cache_home, tiny_i2v, tmp_path):
    """If this fails, `--offload experts` does not reach the pipeline (the weights stay where they
    were), the plan is not logged at ready with what lives where, or the resident weights per
    component are missing from the ready lines; the run must still write its video."""
    out = tmp_path / "o.mp4"
    args = ["generate", "--prompt", "x", "--image", str(EXAMPLE_IMAGE), "--output", str(out), "--seed", "3"]
    proc = run_cli([*args, "--offload", "experts", "--num-frames", "5"])
    assert proc.returncode == 0, proc.stderr
    assert "memory plan 'experts' for" in proc.stderr
    assert "transformer host, on the card while it runs" in proc.stderr
    # between requests the offloaded weights wait on their host copies; on the CPU both are "cpu"
    assert "resident weights rank 0: transformer " in proc.stderr and " on cpu" in proc.stderr
    assert probe_mp4(out)["num_frames"] == 5
    assert "memory:" not in proc.stdout  # no peak GPU memory on the CPU
