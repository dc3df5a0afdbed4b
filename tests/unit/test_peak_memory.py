"""Where a job's peak GPU memory shows: the job record, the synchronous answers' X-Peak-Memory-MB,
the log line and /metrics. The figure itself comes from the runtime (the maximum over ranks, see
tests/dist/test_peak_memory.py); here the serve front gets an outcome carrying one, as on a GPU,
and one without, as on the CPU."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLE_IMAGE
from tests.unit.test_server_app import FORM, PIPELINE_MS, FakeLoop
from wan_spmd.config import generation_defaults, inspect_model_folder
from wan_spmd.jobs import Outcome
from wan_spmd.memory import MIB, PeakMemory
from wan_spmd.params import Limits
from wan_spmd.serve import QueueJobSource
from wan_spmd.server.app import ServerContext, ServerSettings, create_app
from wan_spmd.server.queue import JobQueue, PendingVideo, VideoAnswer

PEAK = PeakMemory(allocated_mb=61_234.5, reserved_mb=63_000.25)


@pytest.fixture
def ctx(tiny_i2v) -> ServerContext:
    info = inspect_model_folder(tiny_i2v)
    settings = ServerSettings(info=info, defaults=generation_defaults(info), served_model_name="tiny", limits=Limits())
    return ServerContext(settings, JobQueue(max_size=2))


def _run_one(ctx: ServerContext, tmp_path: Path, peak: PeakMemory | None, caplog) -> PendingVideo:
    """One admitted asynchronous job through the real source: taken, then finished with `peak`."""
    from wan_spmd.params import resolve_params

    params = resolve_params(
        dict(FORM), info=ctx.settings.info, defaults=ctx.settings.defaults, image=EXAMPLE_IMAGE.read_bytes()
    )
    pending = PendingVideo(id=ctx.videos.new_id(), params=params, created=1, detached=True)
    ctx.track(pending)
    ctx.queue.submit(pending)
    source = QueueJobSource(ctx.queue, tmp_path, ctx.videos, ctx.metrics.observe, ctx.metrics.observe_memory)
    job = source.next_job(1.0)
    video = tmp_path / "v.mp4"
    video.write_bytes(b"mp4")
    with caplog.at_level(logging.INFO, logger="wan_spmd"):
        outcome = Outcome.settle(job, video_path=video, timings_ms=dict(PIPELINE_MS))
        outcome.peak_memory = peak  # as the runtime sets it after its reduction over ranks
        source.finish(outcome)
    return pending


def test_record_log_and_metrics_carry_the_peak(ctx, tmp_path, caplog):
    """If this fails, a GPU job's peak memory is lost on its way to the job record
    (`peak_memory_mb`, reserved MiB), the completion log line or the /metrics gauges."""
    pending = _run_one(ctx, tmp_path, PEAK, caplog)
    record = ctx.videos.get(pending.id).public()
    assert record["status"] == "completed" and record["peak_memory_mb"] == 63_000.2
    assert "peak GPU memory 61,234 MiB allocated, 63,000 MiB reserved" in caplog.text
    assert _gauge(ctx, "wan_spmd_job_peak_memory_bytes", "reserved") == 63_000.25 * MIB
    assert _gauge(ctx, "wan_spmd_max_job_peak_memory_bytes", "allocated") == 61_234.5 * MIB
    # a smaller job after it: the last job's gauge follows, the largest stays
    _run_one(ctx, tmp_path, PeakMemory(10.0, 20.0), caplog)
    assert _gauge(ctx, "wan_spmd_job_peak_memory_bytes", "reserved") == 20.0 * MIB
    assert _gauge(ctx, "wan_spmd_max_job_peak_memory_bytes", "reserved") == 63_000.25 * MIB


def _gauge(ctx: ServerContext, name: str, kind: str) -> float | None:
    """One labelled sample of /metrics as Prometheus would read it (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(ctx.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("kind") == kind:
                return sample.value
    return None


def test_cpu_jobs_report_no_peak(ctx, tmp_path, caplog):
    """If this fails, a job on the CPU reports a peak GPU memory (a made-up number) instead of null,
    or /metrics shows a gauge value before any GPU job ran."""
    pending = _run_one(ctx, tmp_path, None, caplog)
    assert ctx.videos.get(pending.id).public()["peak_memory_mb"] is None
    assert _gauge(ctx, "wan_spmd_job_peak_memory_bytes", "reserved") is None


@pytest.mark.parametrize("peak", [PEAK, None], ids=["measured", "unmeasured"])
def test_synchronous_answers_carry_x_peak_memory_mb(ctx, peak):
    """If this fails, a synchronous client (vllm-omni's benchmark reads X-Peak-Memory-MB) loses the
    job's peak, or a CPU job sends a header with a made-up number."""
    ctx.mark_ready()
    reply = VideoAnswer(mp4=b"mp4", path="/x.mp4", timings_ms=dict(PIPELINE_MS), peak_memory=peak)
    FakeLoop(ctx.queue, lambda p: p.resolve(reply))
    image = base64.b64encode(EXAMPLE_IMAGE.read_bytes()).decode()
    with TestClient(create_app(ctx)) as client:
        sync = client.post("/v1/videos/sync", json={**FORM, "input_reference": image})
        assert sync.status_code == 200, sync.text
        assert sync.headers.get("x-peak-memory-mb") == ("63000.2" if peak else None)
    ctx.queue.close("test over")
