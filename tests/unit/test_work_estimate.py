"""The work estimate (`Family.work`) against time on the tiny model: admitted work and deadlines
scale with it, so it must grow as a job's time grows (attention's quadratic term and the VAE)."""

from __future__ import annotations

import time

import torch

from tests.dist.spmd_check import params_for
from wan_spmd.config import inspect_model_folder
from wan_spmd.engine import EngineOptions, build_pipeline
from wan_spmd.params import token_count
from wan_spmd.runtime import Dist


def _cpu_seconds(pipe, params) -> float:
    """A job's CPU time in this process on one thread (the tiny text encoder's share is a few ms). CPU
    time, not wall time: other processes on a shared machine do not move it."""
    start = time.process_time()
    state = pipe.generate_latents(params)
    for _ in pipe.timed_decode(state):
        pass
    return time.process_time() - start


def test_work_estimate_tracks_time_on_the_tiny_model(tiny_t2v):
    """Two tiny-model jobs on the CPU: many steps of a small video, one step of a 4x larger one. The
    estimate's ratio is within 2x of the measured time's; tokens x steps (the old measure) is off by
    more than 2x the other way (it thinks the large video is half the work; decoding it takes
    several times longer). If this fails, --max-work admits jobs that outlast their deadline, or
    the deadline stops jobs that were on time."""
    info = inspect_model_folder(tiny_t2v)
    pipe = build_pipeline(Dist(), info, EngineOptions(device="cpu"))
    small = params_for(info, size="96x96", num_frames=17, num_inference_steps=8, guidance_scale=5.0)
    large = params_for(info, size="192x192", num_frames=17, num_inference_steps=1, guidance_scale=5.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _cpu_seconds(pipe, small)  # allocator and caches warm
        measured = _cpu_seconds(pipe, large) / _cpu_seconds(pipe, small)
    finally:
        torch.set_num_threads(threads)
    estimated = large.work / small.work
    linear = (token_count(info, 192, 192, 17) * 1) / (token_count(info, 96, 96, 17) * 8)
    assert estimated / 2 <= measured <= estimated * 2, (measured, estimated)
    assert measured > 2 * linear, (measured, linear)
