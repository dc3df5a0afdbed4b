"""What the SPMD loop passes between fronts and ranks, without torch: `Job`, `Outcome`, `JobSource`.

A job is broadcast to every rank as primitives (the validated parameters, the image as decoded pixels); its
outcome, on rank 0, carries what a front needs to answer (the finished mp4's path, timings, the
error), never a tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from wan_spmd.params import GenerationParams


@dataclass
class Job:
    """One validated request, as broadcast to every rank (primitives and the image's pixels only)."""

    id: str
    params: GenerationParams
    meta: dict[str, Any] = field(default_factory=dict)
    """Front-specific data (output path, line number); only rank 0 reads it."""
    started: float | None = None
    """Rank 0's time.monotonic() when its source handed it to the loop (`start`); the deadline counts from here."""

    def start(self) -> Job:
        """Start the job's deadline clock (a source calls this as it hands the job out)."""
        self.started = time.monotonic()
        return self

    def overdue(self) -> bool:
        """Past its deadline (params.deadline_s, from its work): a source's `is_cancelled` says stop,
        and the job fails with `deadline_error` at its next denoising step on every rank."""
        limit = self.params.deadline_s
        return limit is not None and self.started is not None and time.monotonic() - self.started > limit

    def deadline_error(self) -> str:
        return (
            f"ran past its deadline of {self.params.deadline_s:.0f} s for {self.params.work} token-steps "
            "(--job-deadline x max(work / --max-work, 0.1)) and was stopped"
        )


@dataclass
class Outcome:
    """How a job ended, as rank 0 reports it to the front."""

    job: Job
    video_path: Path | None = None
    """The complete, verified mp4, already renamed into place (rank 0; None on failure)."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    """The pipeline's stages and PipelineWall, plus Mp4Encoding (the writer's time not hidden by decoding)."""
    error: str | None = None
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.cancelled and self.video_path is not None


class StopLoop:
    """Sentinel a source returns to end the loop on every rank."""


class JobCancelled(RuntimeError):
    """A job's step control said stop (a client went away, a deadline passed, the server is shutting
    down): raised by the pipeline, caught by the SPMD loop."""


class JobSource(Protocol):
    """Where rank 0 gets work from and where outcomes go; the only front-facing interface."""

    def next_job(self, timeout: float) -> Job | None | type[StopLoop]:
        """A job; None if none arrived within `timeout` (a heartbeat goes out); StopLoop to end."""

    def output_path(self, job: Job) -> Path:
        """Where the job's mp4 goes (the front chooses; the delivery writes it there)."""

    def is_cancelled(self, job: Job) -> bool:
        """Whether the job should stop at its next step (client gone, shutdown)."""

    def on_step(self, job: Job, step: int, total: int) -> None:
        """Progress, after each denoising step."""

    def finish(self, outcome: Outcome) -> None:
        """Answer with the outcome (the mp4 is already in place). Rank 0 only."""

    def request_stop(self, reason: str) -> None:
        """Stop after the running job (cancelled at its next step); called from the shutdown watch's thread."""


class OfflineFront:
    """What the offline commands (generate, batch) share as their rank-0 `engine.Front`: nothing
    to start or announce, and a signal stops the source after the running job's next step."""

    source: JobSource

    def start(self) -> None:
        pass

    def ready(self, world_size: int, warmup_s: float) -> None:
        pass

    def on_signal(self, name: str) -> None:
        self.source.request_stop(f"stopped by {name}")

    def on_expire(self, signal_name: str | None) -> None:
        self.stopped(lost=True)

    def stopped(self, lost: bool) -> None:
        pass
