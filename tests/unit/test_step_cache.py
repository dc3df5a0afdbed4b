"""The step cache's flags, request field and policies, and the cache on the tiny model in-process
(compiled blocks included). Its layouts under torchrun are tests/dist/test_step_cache.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import run_cli
from wan_spmd.config import generation_defaults, inspect_model_folder
from wan_spmd.launch import CACHE_DIT_REFUSED, parse_cache_spec
from wan_spmd.params import RequestError, resolve_params
from wan_spmd.step_cache import (
    MAGCACHE_RATIOS,
    TEACACHE_COEFFICIENTS,
    MagCache,
    StepCache,
    TeaCache,
    nearest_interp,
    published_table,
)

LINEAR_TEA = '{"rel_l1_thresh": 0.4, "ret_steps": 2, "coefficients": [1.0, 0.0]}'


# -- flags --------------------------------------------------------------------------------------


def test_cache_flags_parse_as_vllm_omni_writes_them():
    """If this fails, a vllm-omni script's `--cache-backend tea_cache --cache-config JSON` no longer runs."""
    spec = parse_cache_spec("tea_cache", '{"rel_l1_thresh": 0.25}', summary=True)
    assert (spec.backend, spec.options(), spec.summary) == ("tea_cache", {"rel_l1_thresh": 0.25}, True)
    mag = parse_cache_spec("MAG_CACHE", '{"magcache_K": 3, "mag_ratios": [1, 0.99]}')
    assert mag.options() == {"magcache_K": 3, "mag_ratios": (1.0, 0.99)}
    assert not parse_cache_spec("none", None).enabled


@pytest.mark.parametrize(
    "backend, config, words",
    [
        ("cache_dit", None, "cache-dit 1.5.3's pins fit ours"),
        ("fast_cache", None, "must be one of none, cache_dit, tea_cache, mag_cache"),
        ("tea_cache", "{rel_l1_thresh: 1}", "is not JSON"),
        ("tea_cache", "[1]", "must be a JSON object"),
        ("tea_cache", '{"magcache_K": 2}', "unknown: magcache_K"),
        ("tea_cache", '{"rel_l1_thresh": -1}', "rel_l1_thresh must be > 0"),
        ("mag_cache", '{"magcache_K": 1.5}', "an integer >= 0"),
        ("mag_cache", '{"retention_ratio": 2}', "within [0, 1]"),
        ("mag_cache", '{"mag_ratios": []}', "non-empty list of numbers"),
        ("none", '{"rel_l1_thresh": 0.2}', "needs --cache-backend"),
    ],
)
def test_bad_cache_flags_say_what_is_wrong(backend, config, words):
    """If this fails, a bad cache flag is silently corrected or fails later with a traceback."""
    with pytest.raises(ValueError, match=None) as info:
        parse_cache_spec(backend, config)
    assert words in str(info.value)


def test_cache_dit_exits_2_with_the_reason_before_loading(cache_home, tiny_t2v, tmp_path):
    """If this fails, `--cache-backend cache_dit` (the flag vllm-omni's scripts pass) loads a model and
    hangs or crashes instead of saying in one line why it is not offered."""
    proc = run_cli(
        ["generate", "--model", "tiny-t2v", "--prompt", "x", "--cache-backend", "cache_dit", "--output",
         str(tmp_path / "o.mp4")], timeout=60,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [f"error: {CACHE_DIT_REFUSED}"], proc.stderr


# -- the request field ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, error", [("0.3", None), (0.05, None), ("0", "> 0"), ("nan", "finite"), (11, "at most")]
)
def test_cache_threshold_is_validated_like_the_other_fields(tiny_t2v, value, error):
    """If this fails, a request's cache_threshold reaches the cache unchecked (or a good one is refused)."""
    info = inspect_model_folder(tiny_t2v)
    request = {"prompt": "x", "cache_threshold": value}
    if error is None:
        params = resolve_params(request, info=info, defaults=generation_defaults(info))
        assert params.cache_threshold == float(value)
        return
    with pytest.raises(RequestError, match=error) as exc:
        resolve_params(request, info=info, defaults=generation_defaults(info))
    assert exc.value.field == "cache_threshold"


# -- the policies ---------------------------------------------------------------------------------


def test_tea_cache_accumulates_the_rescaled_change_until_its_threshold():
    """If this fails, TeaCache skips inside its retention steps, ignores its threshold, or keeps
    accumulating after it computed (TeaCache4Wan2.1's rule)."""
    policy = TeaCache(threshold=0.25, coefficients=(1.0, 0.0), ret_steps=2)
    embeddings = [torch.full((1, 6), 1.0 + 0.1 * i) for i in range(8)]  # relative change ~0.09..0.07
    votes = [policy.wants_compute(i, 8, e) for i, e in enumerate(embeddings)]
    assert votes == [True, True, False, False, True, False, False, False]
    assert policy.rescale(0.5) == 0.5
    # the published fit is a 4th-order polynomial, highest power first (numpy.poly1d)
    fit = TeaCache(0.2, TEACACHE_COEFFICIENTS["t2v-14b"], 5)
    c = TEACACHE_COEFFICIENTS["t2v-14b"]
    assert fit.rescale(0.1) == pytest.approx(c[0] * 1e-4 + c[1] * 1e-3 + c[2] * 1e-2 + c[3] * 0.1 + c[4])


def test_mag_cache_skips_at_most_k_in_a_row_after_its_retention():
    """If this fails, MagCache skips during its retained first steps, more than K in a row, or past
    its error threshold (MagCache's rule)."""
    flat = (1.0,) * 20
    policy = MagCache(threshold=0.5, max_skips=2, retention=0.25, ratios=flat)
    assert [policy.wants_compute(i, 8) for i in range(8)] == [True, True, False, False, True, False, False, True]
    strict = MagCache(threshold=0.01, max_skips=5, retention=0.0, ratios=(0.9,) * 20)
    assert all(strict.wants_compute(i, 6) for i in range(6))  # |1 - 0.9| > 0.01 every step


def test_published_tables_are_whole_and_picked_by_model():
    """If this fails, a published table lost a value in transcription, or the wrong fit is used."""
    # (cond, uncond) per step of the calibration runs: Wan2.1 T2V's 50 steps, I2V's 40
    assert {k: len(v) for k, v in MAGCACHE_RATIOS.items()} == {"t2v-14b": 100, "i2v-480p": 80, "i2v-720p": 80}
    assert all(len(c) == 5 for c in TEACACHE_COEFFICIENTS.values())
    assert published_table("wan2.2-i2v-a14b", 832, 480) == "i2v-480p"
    assert published_table("wan2.2-i2v-a14b", 1280, 720) == "i2v-720p"
    assert published_table("wan2.2-t2v-a14b", 1280, 720) == "t2v-14b"
    assert nearest_interp(tuple(range(50)), 40)[-1] == 49 and len(nearest_interp(tuple(range(50)), 40)) == 40


# -- on the tiny model ----------------------------------------------------------------------------


def _pipeline(folder, cache: str | None = None, config: str | None = None, compile_backend: str | None = None):
    from wan_spmd.compiling import compile_blocks
    from wan_spmd.models import load_components
    from wan_spmd.pipeline import WanVideoPipeline

    info = inspect_model_folder(folder)
    comps = load_components(info, torch.device("cpu"))
    for expert in comps.experts if compile_backend else ():
        compile_blocks(expert, compile_backend)
    pipe = WanVideoPipeline(comps, info, torch.device("cpu"))
    if cache is not None:
        pipe.step_cache = StepCache(parse_cache_spec(cache, config), info.family.name, info.family.expert_names)
        pipe.step_cache.install(pipe.experts)
    return info, pipe


def _params(info, **extra):
    request = {"prompt": "a kite", "seed": 3, "num_inference_steps": 10, **extra}
    return resolve_params(request, info=info, defaults=generation_defaults(info))


def test_a_cache_that_computes_every_step_is_bitwise_uncached(tiny_t2v):
    """If this fails, the cache's marks change computed steps (a copy, a cast, an in-place add): a
    request whose threshold skips nothing would differ from the same request without a cache."""
    info, plain = _pipeline(tiny_t2v)
    _, cached = _pipeline(tiny_t2v, "mag_cache")
    params = _params(info, cache_threshold=1e-9)
    ref = plain.generate_latents(params).latents
    got = cached.generate_latents(params)
    assert all(cached.step_cache.decisions)
    assert torch.equal(ref, got.latents)
    assert got.timer.ms["StepCacheSkipped/transformer"] == 0 and got.timer.ms["StepCacheForwards/transformer"] > 0


def test_compiled_blocks_serve_cached_and_computed_steps_without_recompiling(tiny_t2v):
    """If this fails, the cache decision sits inside a compiled region (a graph per decision), or a
    skipped step feeds the compiled blocks new shapes: requests would pay compiles per step."""
    from wan_spmd.compiling import compiled_graphs

    info, eager = _pipeline(tiny_t2v, "tea_cache", LINEAR_TEA)
    _, compiled = _pipeline(tiny_t2v, "tea_cache", LINEAR_TEA, compile_backend="aot_eager")
    first = _params(info)
    compiled.generate_latents(first)  # compiles here
    before = compiled_graphs()
    for threshold in (0.4, 0.8):  # two skip patterns, same shape
        params = dataclasses.replace(first, cache_threshold=threshold, seed=4)
        got = compiled.generate_latents(params).latents
        assert not all(compiled.step_cache.decisions), "nothing was skipped: the check would be empty"
        ref = eager.generate_latents(params).latents
        assert compiled.step_cache.decisions == eager.step_cache.decisions
        assert (got - ref).abs().max().item() <= 1e-4
    assert compiled_graphs() == before


def test_residual_memory_is_what_the_docs_say():
    """If this fails, the memory figure in docs/step_cache.md (2 x 335 MB for A14B at 832x480x81 on one
    GPU) no longer matches what the cache holds."""
    from wan_spmd.step_cache import residual_bytes

    tokens = 21 * (480 // 16) * (832 // 16)  # latent frames x rows x columns after the patch
    assert residual_bytes(tokens, 5120, 2, branches=2) == 2 * 335_462_400
    assert residual_bytes(tokens, 5120, 2, branches=1, token_parts=4) == 83_865_600


def test_skip_counts_are_counts_in_metrics_and_in_generate_output():
    """If this fails, the step cache's k-of-n counts are reported as latencies (a histogram of
    "seconds", an "ms" suffix) instead of counts."""
    from wan_spmd.generate import timings_line
    from wan_spmd.server.metrics import ServerMetrics

    timings = {"Denoising": 1500.0, "StepCacheSkipped/transformer": 12.0, "StepCacheForwards/transformer": 40.0}
    assert timings_line(timings) == "Denoising=1500ms StepCacheSkipped/transformer=12 StepCacheForwards/transformer=40"
    metrics = ServerMetrics(lambda: 0, lambda: 0)
    metrics.observe(timings)
    text = metrics.render().decode()
    assert 'wan_spmd_step_cache_forwards_total{expert="transformer",result="skipped"} 12.0' in text
    assert 'wan_spmd_step_cache_forwards_total{expert="transformer",result="all"} 40.0' in text
    assert "StepCache" not in "".join(line for line in text.splitlines() if "stage_seconds" in line)


def test_http_takes_cache_threshold_as_a_form_field_and_refuses_a_bad_one(tiny_i2v):
    """If this fails, vllm-omni-style clients cannot move the cache's threshold per request over HTTP,
    or a bad value reaches the job instead of a 400 naming the field."""
    from fastapi.testclient import TestClient

    from tests.conftest import EXAMPLE_IMAGE
    from wan_spmd.params import Limits
    from wan_spmd.server.app import ServerContext, ServerSettings, create_app
    from wan_spmd.server.queue import Closed, JobQueue, VideoAnswer

    info = inspect_model_folder(tiny_i2v)
    settings = ServerSettings(
        info=info, defaults=generation_defaults(info), served_model_name="tiny", limits=Limits(), sync_videos=True
    )
    ctx = ServerContext(settings, JobQueue(max_size=1))
    ctx.mark_ready()
    seen = []

    def loop() -> None:
        while (item := ctx.queue.take(0.05)) is not Closed:
            if item is not None:
                seen.append(item)
                item.resolve(VideoAnswer(mp4=b"\x00\x00\x00\x18ftypisom", path="/x.mp4", timings_ms={}))

    import threading

    threading.Thread(target=loop, daemon=True).start()
    form = {"prompt": "a cat", "size": "64x48", "num_frames": "5", "num_inference_steps": "2", "seed": "3"}
    files = {"input_reference": ("cat.png", EXAMPLE_IMAGE.read_bytes(), "image/png")}
    with TestClient(create_app(ctx)) as client:
        r = client.post("/v1/videos/sync", data={**form, "cache_threshold": "-0.1"}, files=files)
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_threshold", r.text
        r = client.post("/v1/videos/sync", data={**form, "cache_threshold": "0.3"}, files=files)
        assert r.status_code == 200, r.text
    ctx.queue.close("test over")
    (job,) = seen
    assert job.params.cache_threshold == 0.3


def test_the_memory_plan_counts_the_cached_residuals():
    """If this fails, --cache-backend's residuals (held while denoising) are missing from the memory
    plan, so a budget that fits without them could run out with them."""
    from wan_spmd.config import REAL_MODELS
    from wan_spmd.memory import Request, activations
    from wan_spmd.step_cache import residual_bytes

    config = REAL_MODELS["wan2.2-i2v-a14b"].transformer_config
    request = Request(1280, 720, 81, 75_600, image_condition=True)
    for tp, ulysses, world, branches in ((1, 1, 1, 2), (2, 1, 2, 2), (2, 2, 8, 1)):  # the last: CFG-parallel
        plain = activations(request, config, tp, ulysses, world)
        cached = activations(request, config, tp, ulysses, world, step_cache=True)
        expected = residual_bytes(75_600, 5120, 2, branches, token_parts=tp * ulysses)
        assert cached.denoise - plain.denoise == expected
        assert (cached.decode, cached.vae_encode) == (plain.decode, plain.vae_encode)
