"""Sharded loading and dummy weights under a real torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT, cli_env, run_torchrun_script

CHECK = Path(__file__).with_name("spmd_check.py")
HOST_MEMORY = ROOT / "benchmarks" / "host_memory.py"


def test_each_rank_holds_about_half_the_expert_in_host_memory(tmp_path):
    """If this fails, a rank materialises the whole expert (or keeps the file mapped) while loading:
    with 2 ranks each one's peak RSS growth must stay near half the checkpoint plus a fixed overhead."""
    folder = tmp_path / "expert"
    written = subprocess.run(
        [sys.executable, str(HOST_MEMORY), "write", str(folder), "--layers", "8", "--dim", "1536", "--ffn", "6144"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        check=True,
    )
    size_mib = json.loads(written.stdout.strip().splitlines()[-1])["written_mib"]
    assert size_mib > 500
    proc = run_torchrun_script(HOST_MEMORY, ["load", str(folder)], nproc=2)
    assert proc.returncode == 0, proc.stderr
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert abs(r["local_weights_mib"] - size_mib / 2) < 0.05 * size_mib  # its half (+ small replicated)
        assert r["peak_growth_mib"] < size_mib / 2 + 150, r  # never the whole expert
    assert ranks[0]["checksum"] != ranks[1]["checksum"]  # different halves


def test_dummy_weights_are_the_same_model_at_every_tp_size(spmd_runs):
    """Dummy weights made already sharded must be the TP=1 model split, or TP benchmarks compare
    different models (sequence-parallel regions on: 48 tokens)."""
    out = spmd_runs("dummy", 1, 2)
    one, two = torch.load(out / "dummy-1.pt"), torch.load(out / "dummy-2.pt")
    assert one.std() > 0.01 and (one - two).abs().max().item() < 1e-5


def test_lora_fused_per_slice_tp2_equals_tp1(spmd_runs):
    """LoRAs (one on the high-noise expert, one on both, in the two formats) fused into each rank's
    slices at TP=2 give TP=1's latents, from the folder and on dummy weights. If this fails, a rank
    took the wrong rows of B or columns of A, or a replicated bias got its delta twice."""
    out = spmd_runs("lora", 1, 2)  # the LoRA files: written by the spmd_runs fixture
    one, two = torch.load(out / "lora-1.pt"), torch.load(out / "lora-2.pt")
    for key in ("latents", "dummy"):
        assert (one[key] - two[key]).abs().max().item() <= 1e-4, key
        assert one[key].std() > 0.01
