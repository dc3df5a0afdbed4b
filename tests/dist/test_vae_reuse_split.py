"""Exact reuse in the I2V condition encode composed with the row-split VAE, under a real torchrun
(gloo on CPU) with 2 and 4 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_torchrun_script
from wan_spmd.vae_reuse import bits_equal

SCRIPT = Path(__file__).with_name("vae_reuse_check.py")


@pytest.mark.parametrize("world", [2, 4])
def test_reuse_composes_with_the_row_split(tmp_path, world):
    """If this fails, the reusing encode split over ranks differs from the same split computed
    whole (a stage reused on stale input or cache, a band's halo from a neighbour that changed), or
    the ranks did not agree on which stages to skip (they would hang or mix up their halo rows:
    the black-top case repeats on the top rank long before the others)."""
    run = run_torchrun_script(SCRIPT, [str(tmp_path)], nproc=world, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = torch.load(tmp_path / f"reuse-{world}.pt")
    assert len(saved) == 3
    for name, case in saved.items():
        full, mine = case["full"], case["reuse"]
        assert full.shape == mine.shape and full.dtype == mine.dtype, name
        assert bits_equal(full, mine), name
        assert full.float().std() > 0, name
        assert 0 < case["reused"] < case["calls"], name
