"""Warm-up compiles and nothing more: on the tiny model (CPU, one rank, the blocks compiled with
aot_eager: the graphs inductor would get), the warm-up forwards compile exactly the graphs a request
needs and the first request after them compiles none."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from wan_spmd.config import generation_defaults
from wan_spmd.engine import EngineOptions, JobRunner, Startup, build_pipeline, measure_warm_up
from wan_spmd.jobs import Job
from wan_spmd.launch import resolve_layout, resolve_model
from wan_spmd.params import resolve_params
from wan_spmd.runtime import init_dist

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "example.png"


@pytest.fixture(autouse=True)
def _fresh_dynamo(keep_compile_cache_settings):
    """Counters from zero; the cache's settings (environment, torch's switches) put back after."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield


@pytest.mark.parametrize("variant", ["tiny", "tiny-ti2v"])
def test_warm_up_compiles_what_the_first_request_needs(cache_home, tmp_path, variant):
    """Two warm-up shapes compile two graphs (the static one of the first, the dynamic one the
    second makes), for both experts and both CFG branches together; a request of a third size
    after them compiles nothing (no NewCompiledGraphs in its timings). If this fails, warm-up
    compiles less than a request needs (the first request pays a compile) or runs more than the
    forwards (text encoder, VAE: the ready line's compute would grow again)."""
    info = resolve_model(variant)
    options = EngineOptions(
        layout=resolve_layout(1), device="cpu", compile=True, compile_backend="aot_eager", compile_cache=tmp_path
    )
    d = init_dist("cpu")
    startup = Startup()
    pipe = build_pipeline(d, info, options, startup=startup)
    calls = {"text": 0, "vae": 0}

    def counted(name, method):
        def call(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)

        return call

    pipe.encode_prompt = counted("text", pipe.encode_prompt)
    pipe.decode_chunks = counted("vae", pipe.decode_chunks)

    m = info.spatial_multiple  # 16 (A14B's VAE and patch), 32 (TI2V's)
    measure_warm_up(pipe, ((4 * m, 4 * m, 5), (3 * m, 2 * m, 9)), startup)
    assert startup.graphs == 2, startup
    assert calls == {"text": 0, "vae": 0}  # forwards only
    assert startup.cache is not None and startup.cache.folder.parent == tmp_path
    assert "compile " in startup.describe() and "warm-up compute" in startup.describe()

    request = {"prompt": "a kite", "seed": 1, "size": f"{5 * m}x{3 * m}", "num_frames": 5, "num_inference_steps": 2}
    image = EXAMPLE.read_bytes() if info.family.takes_image else None
    params = resolve_params(request, info=info, defaults=generation_defaults(info), image=image)
    report = JobRunner(pipe, 0)(Job("first", params), lambda *args: True, lambda *args: None, None)
    assert "NewCompiledGraphs" not in report.timings_ms, report.timings_ms
    assert calls["text"] >= 1  # the request did run the whole pipeline


def test_without_warm_up_the_first_request_pays(cache_home, tmp_path):
    """The control: the same request with no warm-up compiles its graph and says so, so the test
    above can fail."""
    info = resolve_model("tiny")
    options = EngineOptions(
        layout=resolve_layout(1), device="cpu", compile=True, compile_backend="aot_eager", compile_cache=None
    )
    pipe = build_pipeline(init_dist("cpu"), info, dataclasses.replace(options))
    request = {"prompt": "a kite", "seed": 1, "size": "64x64", "num_frames": 5, "num_inference_steps": 1}
    params = resolve_params(request, info=info, defaults=generation_defaults(info), image=EXAMPLE.read_bytes())
    report = JobRunner(pipe, 0)(Job("first", params), lambda *args: True, lambda *args: None, None)
    assert report.timings_ms["NewCompiledGraphs"] == 1
