"""What the SPMD loop passes between fronts and ranks, without torch: `Job`, `Outcome`, `JobSource`.

A job is broadcast to every rank as primitives (the validated parameters, the image as decoded pixels);
its outcome, on rank 0, carries what a front needs to answer (the finished mp4's path, timings, the
error), never a tensor.

The three fronts (`generate`, `batch`, the HTTP server) are job sources with one protocol, and they
share what is not theirs to decide (`SourceBase`): when a running job must stop (a shutdown, the
front's own cancel, the deadline) and why. The first reason seen is kept on the job (`Job.stop`),
and `Outcome.settle` turns a run into its one status, so a job cancelled near its deadline is
reported as cancelled, whatever the clock says by the time the front answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from wan_spmd.memory import PeakMemory
from wan_spmd.params import GenerationParams

StopKind = Literal["shutdown", "cancelled", "deadline"]
Status = Literal["ok", "failed", "shutdown", "cancelled", "deadline"]
"""How a job ended: made and in place; failed on some rank; or stopped, and by what: a signal (the
process is stopping), the front (client gone, DELETE), or its deadline."""


@dataclass(frozen=True)
class Stop:
    """Why rank 0 said stop to a running job (the first reason it saw)."""

    kind: StopKind
    reason: str


@dataclass
class Job:
    """One validated request, as broadcast to every rank (primitives and the image's pixels only)."""

    id: str
    params: GenerationParams
    line: int | None = None
    """batch: the request's 1-based line in the JSONL file."""
    output: str | None = None
    """batch: the video's name relative to --output-dir."""
    frames_dir: str | None = None
    """generate: also write every frame as a PNG into this folder (rank 0)."""
    started: float | None = None
    """Rank 0's time.monotonic() when its source handed it to the loop (`start`); the deadline counts from here."""
    stop: Stop | None = None
    """Rank 0: the first stop its source asked for (`check_stop`), kept so the answer names that one."""

    def start(self) -> Job:
        """Start the job's deadline clock (a source calls this as it hands the job out)."""
        self.started = time.monotonic()
        return self

    def overdue(self) -> bool:
        """Past its deadline (params.deadline_s, from its work)."""
        limit = self.params.deadline_s
        return limit is not None and self.started is not None and time.monotonic() - self.started > limit

    def deadline_error(self) -> str:
        return (
            f"ran past its deadline of {self.params.deadline_s:.0f} s for {self.params.work} token-steps "
            "(--job-deadline x max(work / --max-work, 0.1)) and was stopped"
        )


@dataclass
class Outcome:
    """How a job ended, as rank 0 reports it to the front. Made by `settle` only."""

    job: Job
    status: Status
    video_path: Path | None = None
    """The complete, verified mp4, already renamed into place (rank 0; None unless ok)."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    """The pipeline's stages and PipelineWall, plus Mp4Encoding (the writer's time not hidden by decoding)."""
    error: str | None = None
    """What went wrong (failed), or where the job stopped (stopped: "cancelled at step 3 of 8")."""
    job_ms: float | None = None
    """Rank 0's wall time of the job inside the loop, from broadcast to outcome."""
    peak_memory: PeakMemory | None = None
    """The job's peak GPU memory, the maximum over ranks (None on the CPU, or unless ok)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def stop(self) -> Stop | None:
        return self.job.stop

    @classmethod
    def settle(
        cls,
        job: Job,
        *,
        stopped: bool = False,
        error: str | None = None,
        video_path: Path | None = None,
        timings_ms: dict[str, float] | None = None,
        shutdown: str | None = None,
    ) -> Outcome:
        """The one place a status is decided. `stopped`: the agreed step or chunk control ended the
        job (the reason is `job.stop`, latched when rank 0 said stop). A failure while the process is
        shutting down (`shutdown`: the source's stop reason) counts as that stop: a signal to the
        whole process group kills ffmpeg too, and its write error is the signal's doing."""
        if not stopped and error is not None and job.stop is None and shutdown is not None:
            job.stop, stopped = Stop("shutdown", shutdown), True
            error = f"stopped while writing the video ({error})"
        if stopped:
            kind = job.stop.kind if job.stop is not None else "cancelled"
            return cls(job, kind, error=error or "cancelled")
        if error is not None or video_path is None:
            return cls(job, "failed", error=error or "failed", timings_ms=dict(timings_ms or {}))
        return cls(job, "ok", video_path=video_path, timings_ms=dict(timings_ms or {}))


class StopLoop:
    """Sentinel a source returns to end the loop on every rank."""


class JobCancelled(RuntimeError):
    """A job's step control said stop (a client went away, a deadline passed, the server is shutting
    down): raised by the pipeline, caught by the SPMD loop."""


class JobSource(Protocol):
    """Where rank 0 gets work from and where outcomes go; the only front-facing interface."""

    stop_reason: str | None
    """Set once the process is stopping (a signal): no new job starts, the running one stops."""

    def next_job(self, timeout: float) -> Job | None | type[StopLoop]:
        """A job; None if none arrived within `timeout` (a heartbeat goes out); StopLoop to end."""

    def output_path(self, job: Job) -> Path:
        """Where the job's mp4 goes (the front chooses; the delivery writes it there)."""

    def check_stop(self, job: Job) -> bool:
        """Whether the running job must stop at its next step or decoded chunk (keeping why on `job.stop`)."""

    def on_step(self, job: Job, step: int, total: int) -> None:
        """Progress, after each denoising step."""

    def finish(self, outcome: Outcome) -> None:
        """Answer with the outcome (the mp4 is already in place). Rank 0 only."""

    def request_stop(self, reason: str) -> None:
        """Stop after the running job (stopped at its next step or chunk); called from the shutdown watch's thread."""


class SourceBase:
    """The stop logic every front shares: a shutdown first, then the front's own cancel
    (`cancel_reason`), then the job's deadline. The first reason seen sticks to the job."""

    stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def cancel_reason(self, job: Job) -> str | None:
        """The front's own reason to stop `job` (client gone, deleted); None: none."""
        return None

    def check_stop(self, job: Job) -> bool:
        if job.stop is None:
            if self.stop_reason is not None:
                job.stop = Stop("shutdown", self.stop_reason)
            elif (reason := self.cancel_reason(job)) is not None:
                job.stop = Stop("cancelled", reason)
            elif job.overdue():
                job.stop = Stop("deadline", job.deadline_error())
        return job.stop is not None


class OfflineFront:
    """What the offline commands (generate, batch) share as their rank-0 `engine.Front`: nothing
    to start or announce, and a signal stops the source after the running job's next step."""

    source: JobSource

    def start(self) -> None:
        pass

    def ready(self, world_size: int, startup: object) -> None:
        pass

    def on_signal(self, name: str) -> None:
        self.source.request_stop(f"stopped by {name}")

    def on_expire(self, signal_name: str | None) -> None:
        self.stopped(lost=True)

    def stopped(self, lost: bool) -> None:
        pass

    def warmup_shapes(self) -> tuple[tuple[int, int, int], ...]:
        return ()
