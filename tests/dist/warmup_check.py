"""A test-owned SPMD program (run under a real torchrun, gloo): the forwards-only warm-up under a
2-rank CFG-parallel layout, where a request runs either split (guidance on: each cfg group its
branch over the narrow group; guidance off: one forward over the wide cfg x ulysses group).

    torchrun --nproc-per-node 2 tests/dist/warmup_check.py OUT

Rank 0 writes OUT/warmup.json: the graphs the warm-up compiled, and the new graphs of a guidance-on
and a guidance-off request of a third size after it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from wan_spmd.config import generation_defaults
from wan_spmd.engine import EngineOptions, JobRunner, Startup, build_pipeline, measure_warm_up
from wan_spmd.jobs import Job
from wan_spmd.launch import resolve_layout, resolve_model
from wan_spmd.params import resolve_params
from wan_spmd.process import finish_process, setup_logging, torchrun_env
from wan_spmd.runtime import init_dist, shutdown

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "example.png"


def main(out: Path) -> None:
    rank, world_size, _ = torchrun_env()
    setup_logging(rank)
    d = init_dist("cpu")
    info = resolve_model("tiny")
    layout = resolve_layout(world_size, cfg_parallel=True)
    options = EngineOptions(layout=layout, device="cpu", compile=True, compile_backend="aot_eager", compile_cache=None)
    startup = Startup()
    pipe = build_pipeline(d, info, options, startup=startup)
    measure_warm_up(pipe, ((64, 64, 5), (48, 32, 9)), startup)
    runner = JobRunner(pipe, d.rank)
    new_graphs = {}
    for name, guidance in (("guided", 4.0), ("unguided", 1.0)):
        request = {"prompt": "a kite", "seed": 1, "size": "80x48", "num_frames": 5, "num_inference_steps": 2}
        params = resolve_params(
            {**request, "guidance_scale": guidance, "guidance_scale_2": guidance},
            info=info,
            defaults=generation_defaults(info),
            image=EXAMPLE.read_bytes(),
        )
        report = runner(Job(name, params), lambda *args: True, lambda *args: None, None)
        new_graphs[name] = report.timings_ms.get("NewCompiledGraphs", 0.0)
    if d.is_main:
        (out / "warmup.json").write_text(json.dumps({"warmup_graphs": startup.graphs, "new_graphs": new_graphs}))
    shutdown(d)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    finish_process(0)
