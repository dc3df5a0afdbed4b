"""A test-owned SPMD program for the step cache, run alone (N=1) and under a real torchrun (gloo).

step_cache_check.py OUT L1,L2   for each named layout (spmd_check.LAYOUTS) and each backend, the
    tiny T2V and I2V models with CFG on (and T2V with guidance off) through the engine's pipeline,
    every step agreed on the real control plane as the SPMD loop agrees it; rank 0 saves latents
    and each rank its decisions. With more than one rank, then: the same job with each rank
    given another MagCache threshold (its decision's input differs per rank), so the ranks'
    own votes differ; every rank saves its votes and the agreed decisions.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from tests.dist.spmd_check import LAYOUTS, params_for
from wan_spmd.engine import EngineOptions, build_pipeline
from wan_spmd.process import finish_process, setup_logging, torchrun_env
from wan_spmd.launch import parse_cache_spec, resolve_layout, resolve_model
from wan_spmd.runtime import ControlPlane, JobAgreement, init_dist, shutdown

# tea: a linear rescale (the published fits are for real weights; on random ones they never skip)
BACKENDS = {
    "tea": ("tea_cache", '{"rel_l1_thresh": 0.4, "ret_steps": 2, "coefficients": [1.0, 0.0]}'),
    "mag": ("mag_cache", '{"magcache_K": 3}'),
}
REQUESTS = {"cfg": {"num_inference_steps": 6}, "g1": {"num_inference_steps": 6, "guidance_scale": 1.0}}
CASES = [("tiny-t2v", "cfg"), ("tiny-t2v", "g1"), ("tiny", "cfg")]


def run_agreed(d, pipe, params) -> torch.Tensor:
    """One job's latents with the runtime's own step agreement and cache agreement."""
    agreement = JobAgreement(ControlPlane(d), lambda: False)
    state = pipe.generate_latents(params, control=agreement, cache_agree=agreement.agree_compute)
    return state.latents


def mode_layouts(d, out: Path, names: str) -> None:
    for name in names.split(","):
        layout = resolve_layout(d.world_size, **LAYOUTS[name])
        decisions = {}
        for backend, (cache_backend, config) in BACKENDS.items():
            options = EngineOptions(layout=layout, device="cpu", cache=parse_cache_spec(cache_backend, config))
            for model in ("tiny-t2v", "tiny"):
                info = resolve_model(model)
                pipe = build_pipeline(d, info, options)
                for case_model, request in CASES:
                    if case_model != model:
                        continue
                    latents = run_agreed(d, pipe, params_for(info, **REQUESTS[request]))
                    key = f"{backend}-{model}-{request}"
                    decisions[key] = {
                        "decisions": pipe.step_cache.decisions,
                        "stats": pipe.step_cache.stats.timings(),
                    }
                    if d.is_main:
                        torch.save(latents, out / f"{name}-{key}.pt")
        (out / f"decisions-{name}-{d.rank}.json").write_text(json.dumps(decisions))
    if d.world_size > 1:
        disagree(d, out, names.split(",")[0])


def disagree(d, out: Path, name: str) -> None:
    """Each rank decides from another input (its own MagCache threshold): rank 0 computes nearly
    every step, the last rank would skip whenever it may. The agreed decision must be one."""
    layout = resolve_layout(d.world_size, **LAYOUTS[name])
    threshold = 0.001 if d.rank == 0 else 5.0 if d.rank == d.world_size - 1 else 0.02
    spec = parse_cache_spec("mag_cache", json.dumps({"magcache_thresh": threshold, "magcache_K": 3}))
    info = resolve_model("tiny-t2v")
    pipe = build_pipeline(d, info, EngineOptions(layout=layout, device="cpu", cache=spec))
    params = dataclasses.replace(params_for(info, num_inference_steps=12), cache_threshold=None)
    run_agreed(d, pipe, params)
    result = {"votes": pipe.step_cache.local_votes, "decisions": pipe.step_cache.decisions}
    (out / f"disagree-{d.world_size}-{d.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    out, names = Path(sys.argv[1]), sys.argv[2]
    rank, _, _ = torchrun_env()
    setup_logging(rank)
    d = init_dist("cpu")
    try:
        mode_layouts(d, out, names)
    finally:
        shutdown(d)
    finish_process(0)
