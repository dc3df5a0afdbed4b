"""Tensor parallelism and the SPMD loop under a real torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import EXAMPLE_IMAGE, ROOT, cli_env, run_cli, run_torchrun_script

SCRIPT = Path(__file__).with_name("spmd_check.py")
# TP=2 sums partial products in a different order than TP=1: float32 rounding only.
TOLERANCE = 1e-4


@pytest.fixture
def tp_runs(spmd_runs) -> Path:
    return spmd_runs("tp", 1, 2)


@pytest.mark.parametrize("model", ["tiny", "tiny-t2v"])
def test_tp2_video_matches_tp1(tp_runs, model):
    """If this fails, a sharded expert computes something else than the whole one (I2V and T2V, both
    experts: the tiny models switch experts halfway through their 4 steps)."""
    one = torch.load(tp_runs / f"{model}-1.pt")
    two = torch.load(tp_runs / f"{model}-2.pt")
    assert (one["latents"] - two["latents"]).abs().max().item() <= TOLERANCE
    assert (one["frames"].int() - two["frames"].int()).abs().max().item() <= 1  # 8-bit rounding at most
    assert one["frames"].float().std() > 2


@pytest.fixture
def ti2v_runs(spmd_runs) -> Path:
    return spmd_runs("tp_ti2v", 1, 2)


@pytest.mark.parametrize("case", ["text", "image"])
def test_tp2_ti2v_matches_tp1(ti2v_runs, case):
    """TI2V's timestep is per token: if this fails, the per-token modulation was not split with the
    tokens in the sequence regions (text: 12 tokens, split), or the padding of an uneven count (image:
    9 tokens, padded to 10) or the first-frame conditioning differs between TP=2 and TP=1."""
    one = torch.load(ti2v_runs / f"ti2v-{case}-1.pt")
    two = torch.load(ti2v_runs / f"ti2v-{case}-2.pt")
    assert one["latents"].shape == two["latents"].shape
    assert (one["latents"] - two["latents"]).abs().max().item() <= TOLERANCE
    assert (one["frames"].int() - two["frames"].int()).abs().max().item() <= 1  # 8-bit rounding at most
    assert one["frames"].float().std() > 2


def test_each_rank_holds_half_of_the_sharded_weights(tp_runs):
    """Each of 2 ranks holds 1/2 of every expert's attention and FFN weights (biases of row-parallel
    layers stay whole: 48 of them per attention output and FFN output)."""
    whole = json.loads((tp_runs / "counts-1-0.json").read_text())
    for rank in (0, 1):
        half = json.loads((tp_runs / f"counts-2-{rank}.json").read_text())
        for key, count in whole.items():
            replicated_bias = 2 * 3 * 48  # 2 layers x (attn1.to_out, attn2.to_out, ffn.net.2) x dim 48
            assert half[key] == (count - replicated_bias) // 2 + replicated_bias, key


def test_sharded_attention_with_across_heads_norm_equals_whole(spmd_runs):
    """If this fails, the q/k RMSNorm normalises each rank's heads alone (silently wrong)."""
    result = json.loads((spmd_runs("attn", 2) / "attn.json").read_text())
    assert result["ref_std"] > 0.01
    assert result["max_abs"] <= 1e-5


def test_failed_job_is_reported_and_the_loop_goes_on(spmd_runs):
    """A job failing on rank 1 only (before the first step, or between steps) is agreed, reported by
    rank 0 with rank 1's error; a failure in rank 0's own delivery (inside the job) is reported
    too, with no file left behind; and the next job still runs on both ranks."""
    out = spmd_runs("fault", 2)
    records = json.loads((out / "fault.json").read_text())
    assert [r["id"] for r in records] == ["ok-1", "fail-before", "fail-mid", "fail-decode", "ok-2"]
    assert [r["ok"] for r in records] == [True, False, False, False, True]
    assert "rank 1: RuntimeError: injected before the first step" in records[1]["error"]
    assert "rank 1: RuntimeError: injected at step 2" in records[2]["error"]
    assert records[3]["error"] == "rank 0: RuntimeError: injected in decoding"
    assert json.loads((out / "ran-0.json").read_text()) == json.loads((out / "ran-1.json").read_text()) == 5
    assert sorted(p.name for p in out.glob("*.mp4")) == ["ok-1.mp4", "ok-2.mp4"]
    assert not list(out.glob(".*.part"))


def test_rank0_decoding_longer_than_the_control_timeout(spmd_runs):
    """Rank 0 decodes and writes the mp4 while the others wait at the end-of-job agreement; if that
    wait were bounded by the (short) control timeout, a large video would look like a dead rank 0."""
    records = json.loads((spmd_runs("slow_decode", 2) / "fault.json").read_text())
    assert [(r["id"], r["ok"]) for r in records] == [("slow-1", True), ("slow-2", True)]


@pytest.mark.parametrize(
    "nproc, extra, message",
    # two of the layout checks; every message itself is tested in tests/unit (test_launch, test_params)
    [
        (3, [], "4 attention heads do not split over tp=3"),
        (2, ["--tp", "2", "--cfg-parallel"], "cfg=2 x ulysses=1 x tp=2 = 4 ranks, but the world size is 2"),
    ],
)
def test_bad_arguments_under_torchrun(cache_home, tiny_i2v, nproc, extra, message):
    """Under torchrun every rank exits 2 before the process group starts; the line is printed once
    and none of our tracebacks appear (torchrun then exits 1 with its own summary)."""
    args = ["generate", "--prompt", "x", "--image", str(EXAMPLE_IMAGE), "--output", "/tmp/never.mp4", *extra]
    proc = run_cli(args, nproc=nproc, timeout=120)
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert output.count(message) == 1, output
    assert "wan_spmd/" not in output.split("ChildFailedError")[0]  # no frame of ours in any traceback
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", output)  # torchrun's summary of the ranks
    assert codes and set(codes) == {"2"}, output


def test_generate_under_torchrun_writes_the_same_video(cache_home, tiny_i2v, tmp_path):
    """`torchrun --nproc-per-node 2 -m wan_spmd generate` writes one mp4 (rank 0 only) equal to N=1's."""
    from PIL import Image

    frames = {}
    for nproc in (0, 2):
        out = tmp_path / f"n{nproc}.mp4"
        args = ["generate", "--prompt", "a kite", "--image", str(EXAMPLE_IMAGE), "--seed", "4", "--output", str(out)]
        proc = run_cli([*args, "--frames-dir", str(tmp_path / f"f{nproc}")], nproc=nproc)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("wrote ") == 2  # the mp4 and the PNGs, printed once
        frames[nproc] = [Image.open(p).tobytes() for p in sorted((tmp_path / f"f{nproc}").glob("*.png"))]
    diffs = [max(abs(a - b) for a, b in zip(x, y, strict=True)) for x, y in zip(frames[0], frames[2], strict=True)]
    assert len(frames[2]) == 9 and max(diffs) <= 1  # 8-bit rounding of a 1e-6 difference at most


@pytest.mark.parametrize("nproc, layouts", [(1, "default"), (2, "tp2,u2,cfg")])
def test_compiled_blocks_trace_whole_and_match_eager(spmd_runs, nproc, layouts):
    """The experts' blocks compiled with fullgraph=True (aot_eager: the graphs inductor would get)
    alone and under every 2-rank layout (TP with its sequence regions, Ulysses' all-to-alls,
    CFG-parallel). If this fails, a graph break would have stopped a GPU server at start-up, the
    compiled blocks compute something else, or a third request size pays a compile (the
    dynamic-shape policy of wan_spmd.compiling broke)."""
    results = json.loads((spmd_runs("compile", nproc) / f"compile-{nproc}.json").read_text())
    assert sorted(results) == sorted(layouts.split(","))
    for name, result in results.items():
        assert result["max_abs"] <= TOLERANCE, name
        # graphs compiled (since this layout's start) after each size: some for the first, the
        # dynamic one for the second unless an earlier layout in this process already made the
        # sizes dynamic, and none for the third
        first, second, third = result["graphs"]
        assert first >= 1 and second >= first and third == second, (name, result["graphs"])


def test_compiled_ti2v_blocks_under_tp2_match_eager(spmd_runs):
    """Compiled blocks are the CUDA default: if this fails, TI2V's per-token modulation (split with
    the tokens before the compiled blocks, padded where uneven) breaks the fullgraph trace, which
    would stop a GPU server at start-up, or computes something else than eager."""
    assert json.loads((spmd_runs("compile_ti2v", 2) / "compile-ti2v-2.json").read_text())["max_abs"] <= TOLERANCE
