"""The forwards-only warm-up under CFG-parallel on two real gloo ranks (torchrun)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_torchrun_script

SCRIPT = Path(__file__).with_name("warmup_check.py")


def test_cfg_parallel_warm_up_covers_both_token_splits(cache_home, tiny_i2v, tmp_path):
    """Two warm-up shapes under --cfg-parallel compile four graphs (static and dynamic, for the
    narrow token group of guided requests and the wide cfg x ulysses group of unguided ones), and
    neither a guided nor an unguided request of a third size compiles anything after them. If this
    fails, the warm-up misses a sequence split the layout uses (a guidance-off request, as the
    4-step distillation LoRAs make, would pay a compile), or the ranks' forwards went out of step."""
    proc = run_torchrun_script(SCRIPT, [str(tmp_path)], nproc=2, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "warmup.json").read_text())
    assert result == {"warmup_graphs": 4, "new_graphs": {"guided": 0.0, "unguided": 0.0}}, result
