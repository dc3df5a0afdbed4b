"""The `serve` front: the glue between the HTTP app and the engine's SPMD loop, on rank 0.

The engine starts this front first (so /health can say 503 while the model loads), then every rank
loads its shard; once all agree they are ready, /health is 200. Rank 0's main thread then runs the
SPMD loop fed by `QueueJobSource`: requests come off the bounded queue, every rank runs them, the
engine streams the frames into an mp4 under --output-dir while they decode, and the source resolves
the request's future with the finished file. Other ranks only run the loop.

Staying up and going down: idle ranks wait on the control plane, whose heartbeats are agreements
every rank joins, so a dead or stuck rank is noticed within --heartbeat-timeout. On SIGTERM/SIGINT
rank 0 stops admitting, answers the queue 503 and cancels the running job at its next step; a stop
every rank agreed to exits 0, a lost rank exits 1 (so torchrun --max-restarts or a supervisor
restarts the job), and a main thread still stuck after --stop-grace is ended by the engine's watch
after the last answers are sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from wan_spmd.jobs import Job, Outcome, SourceBase, StopLoop
from wan_spmd.memory import PeakMemory
from wan_spmd.options import default
from wan_spmd.server.http import HttpThread
from wan_spmd.server.options import HttpOptions
from wan_spmd.server.queue import Closed, JobFailed, JobQueue, PendingVideo, Unavailable, VideoAnswer
from wan_spmd.server.videos import VideoStore, default_replica_name

if TYPE_CHECKING:
    from wan_spmd.engine import Startup
    from wan_spmd.server.app import ServerSettings

log = logging.getLogger("wan_spmd")

LOST = "the server lost one of its ranks (dead or stuck) and is stopping so that it can be restarted; retry shortly"


class QueueJobSource(SourceBase):
    """The server's JobSource on rank 0: jobs from the HTTP queue, outcomes to their futures and to
    the job store (status, progress, the finished file)."""

    def __init__(
        self,
        queue: JobQueue,
        output_dir: Path,
        videos: VideoStore | None = None,
        observe: Callable[[dict[str, float]], None] | None = None,
        observe_memory: Callable[[PeakMemory], None] | None = None,
    ) -> None:
        self.queue = queue
        self.output_dir = output_dir
        self.videos = videos if videos is not None else VideoStore(None, default_replica_name())
        self.observe = observe
        """Stage latencies of asynchronous jobs (a synchronous request's route reports its own)."""
        self.observe_memory = observe_memory
        """Every completed job's peak GPU memory (the /metrics gauges)."""
        self.stop_reason: str | None = None
        """Set (from a signal handler too) to stop: the running job is stopped, the queue closed."""
        self._running: dict[str, PendingVideo] = {}
        """Jobs handed to the loop and not yet answered, by id."""

    def request_stop(self, reason: str) -> None:
        """Stop admitting and answer the queue at once (from the shutdown watch's thread); the loop
        then cancels the running job at its next step and broadcasts stop."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.queue.close(reason)

    def next_job(self, timeout: float) -> Job | None | type[StopLoop]:
        if self.stop_reason is not None:
            self.queue.close(self.stop_reason)
        item = self.queue.take(timeout)
        if item is Closed:
            return StopLoop
        if item is None:
            self.videos.sweep()  # idle: let expired jobs and stale temporary files go though nobody asks
            return None
        # The Job is broadcast (pickled) to every rank; its future stays here, on rank 0.
        self._running[item.id] = item
        self.videos.start(item.id)
        p = item.params
        log.info("video %s started: %s x%d frames, %d steps", item.id, p.size, p.num_frames, p.num_inference_steps)
        return Job(item.id, item.params).start()

    def output_path(self, job: Job) -> Path:
        stamp = datetime.fromtimestamp(self._running[job.id].created).strftime("%Y%m%d-%H%M%S")
        return self.output_dir / f"{stamp}_{job.id}.mp4"

    def cancel_reason(self, job: Job) -> str | None:
        pending = self._running[job.id]
        return (pending.cancel_reason or "the client went away") if pending.cancelled else None

    def on_step(self, job: Job, step: int, total: int) -> None:
        self.videos.progress(job.id, step, total)

    def finish(self, outcome: Outcome) -> None:
        """The mp4 is complete and in place (the engine streamed it while decoding): answer."""
        pending = self._running.pop(outcome.job.id)
        if outcome.status == "deadline":
            self.videos.fail(pending.id, "generation_failed", outcome.stop.reason)
            pending.resolve(error=JobFailed(outcome.stop.reason))
            return
        if outcome.stop is not None:  # a shutdown, the client gone, DELETE
            reason = outcome.stop.reason
            log.info("video %s %s: %s", pending.id, outcome.error, reason)
            self.videos.fail(pending.id, "cancelled", f"{outcome.error}: {reason}")
            pending.resolve(error=Unavailable(reason))
            return
        if not outcome.ok:
            self.videos.fail(pending.id, "generation_failed", outcome.error or "unknown error")
            pending.resolve(error=JobFailed(outcome.error or "unknown error"))
            return
        timings = dict(outcome.timings_ms)
        timings["Queue"] = (pending.started_at - pending.enqueued_at) * 1000.0
        # broadcast, per-step agreements, frames to host: the loop's time outside PipelineWall + writer
        job_ms = outcome.job_ms if outcome.job_ms is not None else (time.perf_counter() - pending.started_at) * 1000.0
        timings["Dispatch"] = job_ms - timings.get("PipelineWall", 0.0) - timings.get("Mp4Encoding", 0.0)
        try:  # an asynchronous job's client downloads the file later: nothing to read now
            mp4 = b"" if pending.detached else outcome.video_path.read_bytes()
        except OSError as exc:  # a reply is always sent
            error = f"the finished video could not be read: {exc.strerror or exc}"
            self.videos.fail(pending.id, "generation_failed", error)
            pending.resolve(error=JobFailed(error))
            return
        # the record first, so a waiting client that reads it finds the job completed
        peak = outcome.peak_memory
        if self.videos.complete(pending.id, outcome.video_path, timings, peak.peak_memory_mb if peak else None):
            if self.observe_memory is not None and peak is not None:
                self.observe_memory(peak)
            if pending.detached:
                log.info(
                    "video %s completed -> %s%s",
                    pending.id,
                    outcome.video_path.name,
                    f"; {peak.describe()}" if peak else "",
                )
                if self.observe is not None:
                    self.observe(timings)
        pending.resolve(VideoAnswer(mp4=mp4, path=str(outcome.video_path), timings_ms=timings, peak_memory=peak))

    def close(self, reason: str) -> None:
        """Answer whatever is still waiting or running (the loop may have ended mid-job)."""
        self.abandon(reason)

    def abandon(self, reason: str) -> None:
        """Answer everything waiting or running with 503 now, without waiting for the loop (the
        shutdown watch calls this when the main thread is stuck)."""
        self.queue.close(reason)
        self.videos.fail_unfinished("cancelled", reason)
        for pending in list(self._running.values()):
            pending.resolve(error=Unavailable(reason))
        self._running.clear()


@dataclass(frozen=True)
class ServeOptions:
    """The serve command's transport options (the request limits live in ServerSettings)."""

    host: str = default("host")
    port: int = default("port")
    uds: str | None = None
    max_queue: int = default("max_queue")
    output_dir: Path = default("output_dir", "serve")
    http: HttpOptions = HttpOptions()
    """Connection limit, read deadlines and the Unix socket's mode."""
    replica_name: str = field(default_factory=default_replica_name)
    """In every job id (video_<replica>_...), so a balancer can route polls to the replica that has the job."""
    keep_jobs: int = default("keep_jobs")
    """Finished jobs kept (records and files); the oldest finished goes first."""
    job_ttl_s: float | None = None
    """Seconds a finished job is kept; None: until --keep-jobs evicts it."""
    job_lease_s: float = default("job_lease")
    """Replicas sharing --output-dir: a replica that has not renewed its lease for this long is
    taken for dead and its unfinished jobs are failed by the others."""


class ServeFront:
    """Rank 0's side of `serve`: the HTTP thread, the queue and its job source."""

    def __init__(self, settings: ServerSettings, options: ServeOptions) -> None:
        from wan_spmd.server.app import ServerContext, create_app

        self.settings = settings
        self.options = options
        videos = VideoStore(
            options.output_dir, options.replica_name, options.keep_jobs, options.job_ttl_s, lease_s=options.job_lease_s
        )
        self.ctx = ServerContext(settings, JobQueue(options.max_queue), videos=videos)
        videos.on_remote_delete = self._deleted_elsewhere
        self.source = QueueJobSource(
            self.ctx.queue, options.output_dir, videos, self.ctx.metrics.observe, self.ctx.metrics.observe_memory
        )
        self.http = HttpThread(create_app(self.ctx), options.host, options.port, options.uds, options.http)
        self._started = False
        self._start_error: ValueError | None = None

    def start(self) -> None:
        """Read back the jobs of earlier runs, then listen at once, so /health answers 503 while the
        model loads. The CLI calls it before torch is imported and the engine again: the second
        call only raises the first one's error, for the engine to agree on with the other ranks."""
        if self._started:
            if self._start_error is not None:
                raise self._start_error
            return
        self._started = True
        try:
            self.options.output_dir.mkdir(parents=True, exist_ok=True)
            jobs = self.ctx.videos.load()
        except OSError as exc:
            self._start_error = ValueError(f"cannot read the job records under --output-dir: {exc}")
            raise self._start_error from None
        if jobs:
            log.info("%d job(s) from earlier runs in %s", jobs, self.options.output_dir)
        self.ctx.videos.keep_lease()
        try:
            address = self.http.start()
        except ValueError as exc:
            self._start_error = exc
            raise
        log.info("listening on %s (503 on /health until %d rank(s) have loaded)", address, self.settings.world_size)

    def _deleted_elsewhere(self, video_id: str) -> None:
        """Another replica took a DELETE for one of our jobs: as our own DELETE route does, a queued
        job leaves the queue, a running one stops at its next step."""
        pending = self.ctx.live.get(video_id)
        if pending is not None:
            self.ctx.queue.withdraw(pending, "deleted")

    def ready(self, world_size: int, startup: Startup) -> None:
        self.ctx.mark_ready()
        loras = self.settings.loras  # named by file, scale and content hash, never by path
        log.info(
            "ready: %s on %d rank(s) in %s, writing videos to %s%s",
            self.settings.served_model_name,
            world_size,
            startup.describe(),
            self.options.output_dir,
            "".join(f"; LoRA {c['name']} x{c['scale']:g} ({c['experts']}, sha256 {c['sha256']})" for c in loras),
        )

    def on_signal(self, name: str) -> None:
        """Answer the queue 503 at once; the running job stops at its next step with the same words."""
        self.ctx.mark_stopping()
        self.source.request_stop(f"the server is shutting down ({name})")

    def stopped(self, lost: bool) -> None:
        """Answer everything still waiting, stop HTTP (removing the socket)."""
        self.ctx.mark_stopping("failed" if lost else "stopping")
        self.source.close(LOST if lost else self.source.stop_reason or "the server is shutting down")
        self.ctx.videos.close()
        self.http.stop()

    def on_expire(self, signal_name: str | None) -> None:
        self.ctx.mark_stopping("failed")
        self.source.abandon(self.source.stop_reason if signal_name and self.source.stop_reason else LOST)
        self.ctx.videos.close()
        time.sleep(0.5)  # let the HTTP thread write those answers before the process ends
        self.http.remove_socket()

    def warmup_shapes(self) -> tuple[tuple[int, int, int], ...]:
        return ()  # the preset's shape comes with the engine options

    def exit_code(self, jobs: int, signal_name: str | None) -> int:
        stop = self.source.stop_reason
        log.info("stopped after %d job(s)%s", jobs, f": {stop}" if stop else "")
        return 0
