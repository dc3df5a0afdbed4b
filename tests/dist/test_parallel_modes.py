"""CFG-parallel, Ulysses and their composition with TP, and the row-split VAE, against one rank,
under a real torchrun (gloo on CPU). One run per world size: alone, 2 ranks (tp2, ulysses 2,
cfg-parallel), 4 ranks (cfg-parallel x tp2, tp2 x ulysses 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, cli_env, run_cli, run_torchrun_script

SCRIPT = Path(__file__).with_name("spmd_check.py")
# Different partial-sum orders (TP), a split VAE encode feeding I2V: float32 rounding only.
LATENT_TOLERANCE = 1e-4
# The row-split VAE against the same VAE whole, float output in [-1, 1]: measured 5e-7 on 2 and 4
# ranks (a convolution's summation order on a smaller tensor); 1e-5 leaves room, still far below
# the 1/255 = 3.9e-3 that one 8-bit step is.
VAE_TOLERANCE = 1e-5
TWO_RANKS = ("tp2", "u2", "cfg")
FOUR_RANKS = ("cfg-tp2", "tp2-u2")
TP = {"tp2": 2, "u2": 1, "cfg": 1, "cfg-tp2": 2, "tp2-u2": 2}
WORLD = {**dict.fromkeys(TWO_RANKS, 2), **dict.fromkeys(FOUR_RANKS, 4)}


@pytest.fixture
def layout_runs(spmd_runs) -> Path:
    """tp1 alone, the 2-rank layouts, the 4-rank layouts: the shared runs of each world size."""
    return spmd_runs("layouts", 1, 2, 4)


@pytest.mark.parametrize("request_name", ["cfg", "g1", "odd"])
@pytest.mark.parametrize("model", ["tiny", "tiny-t2v"])
@pytest.mark.parametrize("layout", [*TWO_RANKS, *FOUR_RANKS])
def test_layout_matches_one_rank(layout_runs, layout, model, request_name):
    """If this fails, a parallel mode computes another video than one rank: a CFG branch or the
    exchange mixed up, a guidance-off request split over the cfg groups wrongly, Ulysses' all-to-all
    or its rotary positions wrong, padding of an odd token count (48x48: 27 tokens) attended to, or
    the row-split VAE (which decodes every multi-rank run here) not exact."""
    one = torch.load(layout_runs / f"tp1-{model}-{request_name}.pt")
    got = torch.load(layout_runs / f"{layout}-{model}-{request_name}.pt")
    assert got["latents"].shape == one["latents"].shape
    assert (one["latents"] - got["latents"]).abs().max().item() <= LATENT_TOLERANCE
    assert got["frames"].shape == one["frames"].shape
    assert (one["frames"].int() - got["frames"].int()).abs().max().item() <= 1  # 8-bit rounding at most
    assert one["frames"].float().std() > 2


@pytest.mark.parametrize("layout", [*TWO_RANKS, *FOUR_RANKS])
def test_weights_per_rank_match_the_arithmetic(layout_runs, layout):
    """docs/parallelism.md: each rank holds R + S/tp of each expert (S: the TP plan's sharded
    weights, R: the rest, row-parallel biases included); Ulysses and CFG-parallel replicate. If this
    fails, a layout holds more (or less) than the documented memory per rank."""
    whole = json.loads((layout_runs / "counts-tp1-0.json").read_text())
    row_biases = 2 * 3 * 48  # 2 layers x (attn1.to_out, attn2.to_out, ffn.net.2) x dim 48: replicated
    for rank in range(WORLD[layout]):
        mine = json.loads((layout_runs / f"counts-{layout}-{rank}.json").read_text())
        for key, counts in whole.items():
            sharded = counts["sharded"] - row_biases
            expected = counts["all"] - sharded + sharded // TP[layout]
            assert mine[key]["all"] == expected, (layout, rank, key)


def test_guidance_off_uses_the_cfg_ranks_as_sequence_parallel(layout_runs):
    """With CFG-parallel the tiny model's heads split over cfg x ulysses, so a guidance-1.0 request
    splits its tokens over both groups (the g1 runs above check it computes the same video)."""
    for layout in ("cfg", "cfg-tp2"):
        counts = json.loads((layout_runs / f"counts-{layout}-0.json").read_text())
        assert all(c["widens"] for c in counts.values()), layout
    counts = json.loads((layout_runs / "counts-tp2-u2-0.json").read_text())
    assert not any(c["widens"] for c in counts.values())


@pytest.mark.parametrize("world", [2, 4])
def test_row_split_vae_within_its_tolerance(layout_runs, world):
    """The row-split VAE's decode and encode (rows splitting evenly, and 6 latent rows over 4 ranks:
    2, 2, 1, 1) against the same VAE whole, in float. If this fails, a halo row, the whole-frame
    attention or the band bookkeeping is wrong (errors would be of the signal's size, ~0.2-0.4)."""
    result = json.loads((layout_runs / f"vae-{world}.json").read_text())
    for case in result.values():
        assert case["decode_std"] > 0.1 and case["encode_std"] > 0.05
        assert case["decode_max_abs"] <= VAE_TOLERANCE
        assert case["encode_max_abs"] <= VAE_TOLERANCE


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--cfg-parallel"], "world size 1 does not split into cfg=2 x ulysses=1 groups"),
        (["serve", "--ulysses", "2", "--tp", "1"], "cfg=1 x ulysses=2 x tp=1 = 2 ranks, but the world size is 1"),
        (["generate", "--prompt", "x", "--tp", "2"], "cfg=1 x ulysses=1 x tp=2 = 2 ranks, but the world size is 1"),
    ],
)
def test_every_command_refuses_an_impossible_layout_before_loading(cache_home, tiny_t2v, args, message):
    """The layout flags exist on each command and are checked before torch loads: one line, exit 2."""
    proc = run_cli([*args, "--model", "tiny-t2v"], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in proc.stderr


def test_batch_takes_the_layout_flags(cache_home, tiny_t2v, tmp_path):
    """batch has the same flags (and the same refusal)."""
    requests = tmp_path / "jobs.jsonl"
    requests.write_text('{"prompt": "x"}\n')
    args = ["batch", str(requests), "--output-dir", str(tmp_path / "out"), "--model", "tiny-t2v", "--cfg-parallel"]
    proc = run_cli(args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: world size 1 does not split into cfg=2 x ulysses=1")
