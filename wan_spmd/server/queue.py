"""The bounded queue between the HTTP thread and the SPMD loop, with one future per request.

Torch-free: the app enqueues validated `GenerationParams` and awaits a `VideoAnswer` (bytes and
metadata); the serve glue takes entries on rank 0's main thread, runs them, and resolves the
futures. Every entry's future is resolved exactly once, whatever happens (a reply is always sent).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from wan_spmd.memory import PeakMemory
from wan_spmd.params import GenerationParams


class QueueFull(RuntimeError):
    """More requests are waiting than --max-queue allows (HTTP 429)."""


class Unavailable(RuntimeError):
    """The server cannot take or finish the request now: loading, shutting down (HTTP 503)."""


class JobFailed(RuntimeError):
    """The job ran and failed on some rank (HTTP 500)."""


@dataclass(frozen=True)
class VideoAnswer:
    """A finished video as the HTTP layer sees it: bytes, where it was kept, and its timings."""

    mp4: bytes
    path: str
    """The copy under --output-dir (a server-chosen name)."""
    timings_ms: dict[str, float]
    """The pipeline's stages and PipelineWall, plus Queue, Dispatch and Mp4Encoding."""
    peak_memory: PeakMemory | None = None
    """The job's peak GPU memory, the maximum over ranks (None on the CPU)."""


@dataclass
class PendingVideo:
    """One admitted request on its way through the queue and the loop."""

    id: str
    params: GenerationParams
    created: int
    """Unix time the request was admitted."""
    future: Future[VideoAnswer] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    """When the loop took it (perf_counter); Queue = started_at - enqueued_at."""
    cancelled: bool = False
    """Set when nobody waits for the answer any more; the loop stops the job at its next step."""
    cancel_reason: str | None = None
    """Why it was cancelled (the client went away, deleted), for the answer and the job's record."""
    detached: bool = False
    """An asynchronous job: nobody awaits the future, so the finished mp4 is not read into memory."""
    model: str | None = None
    """The served name the request gave (an alias, perhaps); None: the server's first name."""
    seconds: str | None = None
    """`seconds` as the client wrote it, for the job's record; None: the duration, whole seconds."""
    admitted: dict[str, Any] | None = None
    """The job's video object as it was admitted (queued): the answer to an asynchronous create,
    whatever the loop has done with the job since."""

    def resolve(self, answer: VideoAnswer | None = None, error: BaseException | None = None) -> None:
        """Deliver the answer or the error, once; a future the waiter already dropped is left alone."""
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(answer)
        except InvalidStateError:
            pass


class Closed:
    """What `take` returns once the queue is closed and drained: the loop should stop."""


class JobQueue:
    """FIFO of waiting requests, at most `max_size` of them (the running job is not counted)."""

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"--max-queue must be >= 1, got {max_size}")
        self.max_size = max_size
        self._items: deque[PendingVideo] = deque()
        self._cond = threading.Condition()
        self._closed_reason: str | None = None
        self._taken: set[str] = set()
        """Ids taken by the loop whose answer is not out yet."""

    @property
    def depth(self) -> int:
        return len(self._items)

    @property
    def running(self) -> int:
        """Requests the loop has taken and not yet answered (running, or their mp4 being encoded)."""
        return len(self._taken)

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def submit(self, pending: PendingVideo) -> PendingVideo:
        """Admit a request, or raise QueueFull / Unavailable at once (never block the HTTP thread)."""
        with self._cond:
            self._check_room(0)
            self._append(pending)
        return pending

    def check_room(self) -> None:
        """QueueFull / Unavailable now if a request would be refused: lets a full queue answer 429
        before a body is read. It holds no place: a request takes one only in `submit`, once its
        body is complete and valid, so bodies that never come keep nobody out."""
        with self._cond:
            self._check_room(0)

    def withdraw(self, pending: PendingVideo, reason: str = "the client went away") -> bool:
        """Its client is gone (or the job was deleted): mark it cancelled and, if it still waits,
        give its place back now (not when the loop would have reached it). True if it was waiting
        (it will never run); False if the loop has it (it stops at its next step) or never had it."""
        pending.cancel_reason = reason
        pending.cancelled = True
        with self._cond:
            try:
                self._items.remove(pending)
            except ValueError:
                return False  # taken by the loop already (it stops at the next step) or never queued
        pending.resolve(error=Unavailable(f"cancelled before it started: {reason}"))
        return True

    def _check_room(self, reserved: int) -> None:
        if self._closed_reason is not None:
            raise Unavailable(self._closed_reason)
        if len(self._items) + reserved >= self.max_size:
            raise QueueFull(f"{len(self._items)} requests are waiting (--max-queue {self.max_size})")

    def _append(self, pending: PendingVideo) -> None:
        pending.enqueued_at = time.perf_counter()
        self._items.append(pending)
        self._cond.notify()

    def take(self, timeout: float) -> PendingVideo | None | type[Closed]:
        """The oldest waiting request; None after `timeout` idle; Closed once closed.

        Waits in short slices so a flag set by a signal handler on this thread is seen promptly.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._items:
                    pending = self._items.popleft()
                    if pending.cancelled:  # its client is gone: do not spend the GPUs on it
                        pending.resolve(error=Unavailable("cancelled before it started"))
                        continue
                    pending.started_at = time.perf_counter()
                    self._taken.add(pending.id)
                    pending.future.add_done_callback(lambda _, done=pending.id: self._taken.discard(done))
                    return pending
                if self._closed_reason is not None:
                    return Closed
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 0.25))

    def close(self, reason: str) -> int:
        """Refuse new requests and answer every waiting one with Unavailable(reason); returns how many."""
        with self._cond:
            self._closed_reason = self._closed_reason or reason
            dropped = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        for pending in dropped:
            pending.resolve(error=Unavailable(reason))
        return len(dropped)
