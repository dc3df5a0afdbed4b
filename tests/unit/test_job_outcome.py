"""One status per outcome, decided when the stop was decided (jobs.SourceBase, Outcome.settle),
through the real serve, batch and generate sources (no processes)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.unit.test_video_store import _params
from wan_spmd.generate import OneJobSource
from wan_spmd.jobs import Job, Outcome, Stop
from wan_spmd.serve import QueueJobSource
from wan_spmd.server.queue import JobFailed, JobQueue, PendingVideo, Unavailable
from wan_spmd.server.videos import VideoRecord, VideoStore


def _serve_job(tmp_path: Path, deadline_s: float) -> tuple[QueueJobSource, PendingVideo, Job]:
    queue = JobQueue(max_size=2)
    videos = VideoStore(None, "r1")
    source = QueueJobSource(queue, tmp_path, videos)
    pending = PendingVideo(id="video_r1_1", params=_params(deadline_s=deadline_s), created=int(time.time()))
    videos.add(VideoRecord.new(pending.id, pending.params, "tiny", time.time()))
    queue.submit(pending)
    job = source.next_job(1.0)
    assert isinstance(job, Job)
    return source, pending, job


def _past_deadline(job: Job) -> None:
    job.started = time.monotonic() - job.params.deadline_s - 1.0


def test_job_deleted_near_its_deadline_is_reported_cancelled(tmp_path):
    """A job DELETEd (or whose client left) is stopped at its next step; if its deadline passes
    before the loop hands its outcome to the front, it is still reported cancelled with the delete's
    reason, not generation_failed "ran past its deadline". If this fails, the status is decided from
    the clock at answer time again, not from why the job was stopped."""
    source, pending, job = _serve_job(tmp_path, deadline_s=30.0)
    source.queue.withdraw(pending, "deleted")
    assert source.check_stop(job)  # the step agreement asks rank 0's source
    _past_deadline(job)  # the agreement, the end of the step: the deadline passes meanwhile
    assert source.check_stop(job) and job.stop == Stop("cancelled", "deleted")
    source.finish(Outcome.settle(job, stopped=True, error="cancelled at step 1 of 4"))
    record = source.videos.get(pending.id)
    assert record.status == "failed" and record.error["code"] == "cancelled"
    assert "deleted" in record.error["message"]
    assert isinstance(pending.future.exception(), Unavailable)


def test_job_past_its_deadline_then_signalled_is_reported_overdue(tmp_path):
    """The other order: stopped by its deadline, then SIGTERM arrives before the answer: the job
    failed by its deadline (generation_failed, 500), not cancelled by the shutdown."""
    source, pending, job = _serve_job(tmp_path, deadline_s=30.0)
    _past_deadline(job)
    assert source.check_stop(job)
    source.request_stop("the server is shutting down (SIGTERM)")
    source.finish(Outcome.settle(job, stopped=True, error="cancelled at step 2 of 4"))
    record = source.videos.get(pending.id)
    assert record.error["code"] == "generation_failed" and "deadline" in record.error["message"]
    assert isinstance(pending.future.exception(), JobFailed)


def test_write_failure_during_shutdown_is_the_shutdown(tmp_path):
    """Ctrl-C or systemd's stop signals the whole process group: ffmpeg dies with the engine, and the
    writer's error reaches the outcome before any stop check. That job was stopped by the signal,
    not failed: generate says so and the status is shutdown. If this fails, an interrupted job is
    reported as generation_failed (VideoWriteError)."""
    source = OneJobSource(Job("generate", _params()), tmp_path / "out.mp4")
    job = source.next_job(0.0)
    source.request_stop("stopped by SIGINT")
    outcome = Outcome.settle(job, error="VideoWriteError: ffmpeg could not write", shutdown=source.stop_reason)
    assert outcome.status == "shutdown" and not outcome.ok
    assert outcome.stop == Stop("shutdown", "stopped by SIGINT") and "VideoWriteError" in outcome.error
    # and without a shutdown the same error is a failure
    plain = Outcome.settle(Job("x", _params()), error="VideoWriteError: disk full", shutdown=None)
    assert plain.status == "failed" and plain.stop is None


def test_settle_ok_and_failed():
    """An outcome with its video is ok; a failure without any stop is failed, whatever the clock."""
    job = Job("a", _params(deadline_s=0.001)).start()
    ok = Outcome.settle(job, video_path=Path("a.mp4"), timings_ms={"PipelineWall": 1.0})
    assert ok.ok and ok.status == "ok" and ok.video_path == Path("a.mp4")
    _past_deadline(job)  # past its deadline, but nothing asked it to stop: it still failed, not overdue
    failed = Outcome.settle(job, error="rank 1: RuntimeError: boom")
    assert failed.status == "failed" and failed.error == "rank 1: RuntimeError: boom"
