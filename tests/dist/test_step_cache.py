"""The step cache (--cache-backend tea_cache/mag_cache) under real torchrun (gloo) launches: every
layout on 2 ranks and CFG x TP on 4 gives one rank's video with the same backend and config, and ranks whose
decision inputs differ still take one decision (no hang). One launch per world size serves all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, cli_env, run_torchrun_script
from tests.dist.step_cache_check import BACKENDS, CASES

SCRIPT = Path(__file__).with_name("step_cache_check.py")
LATENT_TOLERANCE = 1e-4  # as test_parallel_modes: partial-sum order under TP, float32 rounding only
TWO_RANKS = ("tp2", "u2", "cfg")
# 4 ranks: CFG groups of a TP pair each. TP with Ulysses (tp2-u2) is left to the 2-rank runs of
# each and to test_parallel_modes: its step cache records and agrees as tp2's and u2's do.
FOUR_RANKS = ("cfg-tp2",)
WORLD = {**dict.fromkeys(TWO_RANKS, 2), **dict.fromkeys(FOUR_RANKS, 4)}


@pytest.fixture(scope="module")
def cache_runs(cache_home, tiny_i2v, tiny_t2v, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("step-cache")
    alone = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "tp1"], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    two = run_torchrun_script(SCRIPT, [str(out), ",".join(TWO_RANKS)], nproc=2, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    four = run_torchrun_script(SCRIPT, [str(out), ",".join(FOUR_RANKS)], nproc=4, timeout=900)
    assert four.returncode == 0, four.stderr[-3000:]
    return out


def _decisions(out: Path, layout: str, rank: int) -> dict:
    return json.loads((out / f"decisions-{layout}-{rank}.json").read_text())


@pytest.mark.parametrize("case", [f"{m}-{r}" for m, r in CASES])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("layout", [*TWO_RANKS, *FOUR_RANKS])
def test_cached_layout_matches_one_rank(cache_runs, layout, backend, case):
    """If this fails, a parallel layout caches differently from one rank: a residual recorded on a
    token shard instead of the whole tokens, a CFG branch reusing the other branch's residual, the
    guidance-off wide split skipping on one cfg group only, or a rank deciding on its own."""
    key = f"{backend}-{case}"
    one = _decisions(cache_runs, "tp1", 0)[key]
    assert any(not c for c in one["decisions"]), "the one-rank run skipped nothing: the check would be empty"
    for rank in range(WORLD[layout]):
        got = _decisions(cache_runs, layout, rank)[key]
        assert got["decisions"] == one["decisions"]
        assert got["stats"] == one["stats"]
    ref = torch.load(cache_runs / f"tp1-{key}.pt")
    latents = torch.load(cache_runs / f"{layout}-{key}.pt")
    assert (ref - latents).abs().max().item() <= LATENT_TOLERANCE


@pytest.mark.parametrize("world", [2, 4])
def test_differing_inputs_still_one_decision(cache_runs, world):
    """If this fails, a rank follows its own cache decision instead of the agreed one: with inputs
    that differ per rank (here each rank's threshold), ranks would skip different steps and the next
    collective would hang (the launch above would have timed out instead of finishing)."""
    runs = [json.loads((cache_runs / f"disagree-{world}-{r}.json").read_text()) for r in range(world)]
    votes = [r["votes"] for r in runs]
    assert any(v != votes[0] for v in votes), "the ranks' own votes agree: the check would prove nothing"
    agreed = [any(step) for step in zip(*votes, strict=True)]  # compute when any rank wants to
    for run in runs:
        assert run["decisions"] == agreed
