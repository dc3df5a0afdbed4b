"""A test-owned SPMD program: every rank reports its own peak GPU memory for one job and the control
plane takes the maximum over ranks (gloo, run under a real torchrun). Rank 0 writes the result to
the file named by argv[1]."""

from __future__ import annotations

import json
import sys

from wan_spmd.process import finish_process
from wan_spmd.memory import PeakMemory
from wan_spmd.runtime import ControlPlane, init_dist, shutdown

d = init_dist("cpu")
plane = ControlPlane(d)
# rank r: allocated 100 + 10 r, reserved 300 - 50 r: the maxima come from different ranks
peak = plane.max_peak_memory(PeakMemory(100.0 + 10 * d.rank, 300.0 - 50 * d.rank))
nothing = plane.max_peak_memory(None)  # a CPU job: no rank measured anything
if d.is_main:
    with open(sys.argv[1], "w") as f:
        json.dump({"peak": [peak.allocated_mb, peak.reserved_mb], "nothing": nothing}, f)
shutdown(d)
finish_process(0)
