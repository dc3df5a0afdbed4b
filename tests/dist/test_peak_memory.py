"""The per-job peak GPU memory is the maximum over ranks, reduced on the control plane."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_torchrun_script

SCRIPT = Path(__file__).with_name("peak_reduce.py")


def test_peak_memory_is_the_maximum_over_ranks(tmp_path):
    """If this fails, a job's reported peak is rank 0's alone (a TP rank holding more would go
    unseen), or the two figures were taken from one rank instead of each its own maximum."""
    out = tmp_path / "peak.json"
    proc = run_torchrun_script(SCRIPT, [str(out)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == {"peak": [110.0, 300.0], "nothing": None}
