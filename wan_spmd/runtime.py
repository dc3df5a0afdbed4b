"""Process groups from torchrun's environment, the control plane, and the SPMD loop.

Every rank runs `spmd_loop`. Rank 0 alone holds a `JobSource` (the CLI's one job, a JSONL file,
the server's queue); it decides what happens next and broadcasts that decision on a gloo
control-plane group, so idle ranks wait on the CPU with heartbeats, never inside an NCCL
collective. A single process without torchrun is the world_size == 1 case of the same code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from wan_spmd.jobs import Job, JobCancelled, JobSource, Outcome, StopLoop
from wan_spmd.memory import PeakMemory
from wan_spmd.process import torchrun_env

log = logging.getLogger("wan_spmd")


class PeerFailed(RuntimeError):
    """Another rank reported a failure at an agreement point; this rank stops the job too."""


class ControlPlaneLost(RuntimeError):
    """A control-plane collective failed or timed out: a peer is dead or stuck, so the ranks can no
    longer agree on anything. The loop ends; the job should exit non-zero so it is restarted."""


# ---------------------------------------------------------------------------------------------
# Process set-up


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: Any = None
    """The gloo control-plane group (None when world_size == 1)."""
    control_after_job: Any = None
    """The same ranks with the collective timeout: the agreements inside a job (per step, at its
    end) and the first message after it, where the others wait while rank 0 writes the mp4 and
    answers, which is part of the job."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(local_rank: int, want: str = "auto") -> torch.device:
    """One device per rank: cuda:LOCAL_RANK when there is a GPU (or asked), else the CPU."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is visible")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
    return torch.device("cuda", local_rank)


def init_dist(device: str = "auto", collective_timeout_s: float = 600.0, control_timeout_s: float = 60.0) -> Dist:
    """Join torchrun's job: NCCL on CUDA, gloo on CPU, plus a gloo control-plane group.

    `collective_timeout_s` bounds the default group's collectives (inside a job only: idle ranks
    never wait there). `control_timeout_s` bounds every control-plane call; rank 0 sends heartbeats
    well inside it, so only a dead or stuck peer makes it expire.
    """
    rank, world_size, local_rank = torchrun_env()
    dev = pick_device(local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return Dist(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = timedelta(seconds=collective_timeout_s)
    store = _attempt_store(world_size, timeout)
    dist.init_process_group(
        backend=backend,
        timeout=timeout,
        device_id=dev if dev.type == "cuda" else None,
        **({"store": store, "rank": rank, "world_size": world_size} if store is not None else {}),
    )
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout_s))
    after_job = dist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank, world_size, local_rank, dev, control=control, control_after_job=after_job)


def _attempt_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """torchrun's store, under a prefix of this restart attempt (None outside torchrun's agent).

    torchrun --max-restarts keeps one store across attempts without a per-attempt prefix (seen with
    torch 2.13): the new ranks would read the dead attempt's gloo/NCCL peer addresses, dial them,
    and fail to start, spending a restart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"wan_spmd/attempt_{attempt}/", agent)


def shutdown(d: Dist) -> None:
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wait_for_all(d: Dist, timeout_s: float) -> None:
    """Return once every rank has got here, waiting up to `timeout_s` rather than the control
    timeout: ranks may finish loading a large model minutes apart. Raises ControlPlaneLost naming
    the ranks that never came."""
    if d.world_size == 1:
        return
    try:
        dist.monitored_barrier(group=d.control, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        raise ControlPlaneLost(f"not every rank arrived within {timeout_s:.0f} s: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class ShutdownWatch:
    """Reacts to SIGTERM/SIGINT at once, even while the main thread is blocked in a collective.

    A Python signal handler runs only once the main thread is back in the interpreter, and a rank
    waiting in gloo or NCCL on a dead or stuck peer may not get there for minutes. So the C-level
    handler writes the signal number to a pipe (`signal.set_wakeup_fd`) and a watcher thread reads
    it: it calls `on_signal(name)` at once, then gives the main thread `grace_s` to leave the `with`
    block; past that it calls `on_expire(name)` and ends the process with `exit_code` through
    `os._exit` (no finally blocks run, so `on_expire` must answer whatever is still waiting).
    `expire_in` starts the same countdown without a signal (a lost peer seen by the main thread);
    `on_expire` then gets None.
    Install from the main thread; repeated signals (torchrun forwards the one a group got) are ignored.
    """

    _ARMED = 0  # byte written by `expire_in`; real signal numbers are > 0

    def __init__(
        self,
        on_signal: Callable[[str], None],
        on_expire: Callable[[str | None], None],
        grace_s: float = 15.0,
        exit_code: int = 1,
        signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    ) -> None:
        self.on_signal = on_signal
        self.on_expire = on_expire
        self.grace_s = grace_s
        self.exit_code = exit_code
        self.signals = tuple(signals)
        self.received: str | None = None
        """The first signal's name, once one arrived."""
        self._left = threading.Event()
        self._pipe: tuple[int, int] | None = None

    def __enter__(self) -> ShutdownWatch:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the C handler must never block
        self._pipe = (read_fd, write_fd)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in self.signals:
            # the watcher does the work; the Python-level handler only keeps the default action away
            signal.signal(signum, lambda *_: None)
        threading.Thread(target=self._watch, name="shutdown-watch", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # The handlers stay: a signal that arrives while the process exits (torchrun forwards the
        # one its group already got) must not turn a clean exit into a death by signal.
        self._left.set()

    def expire_in(self) -> None:
        """Start the grace countdown now, as a signal would (without calling `on_signal`)."""
        if self._pipe is not None:
            os.write(self._pipe[1], bytes([self._ARMED]))

    def _watch(self) -> None:
        assert self._pipe is not None
        wanted = {int(s) for s in self.signals} | {self._ARMED}
        while not (got := [b for b in os.read(self._pipe[0], 64) if b in wanted]):
            pass  # another signal with a Python handler: not ours
        if self._left.is_set():
            return
        if signals := [b for b in got if b != self._ARMED]:
            self.received = signal.Signals(signals[0]).name
            try:
                self.on_signal(self.received)
            except Exception:
                log.exception("handling %s failed", self.received)
        if self._left.wait(self.grace_s):
            return
        try:
            self.on_expire(self.received)
        except Exception:
            log.exception("sending the last answers failed")
        for handler in log.handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(self.exit_code)


RunJob = Callable[[Job, Callable[[int, int], bool], Callable[[int, int], None], Path | None], "JobReport"]
"""Runs one job on this rank, all of it inside the job's collective part: denoising, decoding and,
on rank 0, delivery of the mp4 to the path given (None on the other ranks)."""


@dataclass
class JobReport:
    """What a job left on this rank: the finished mp4 (rank 0) and the stage timings."""

    video_path: Path | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    peak_memory: PeakMemory | None = None
    """This rank's peak GPU memory during the job (None on the CPU: nothing to measure)."""


# ---------------------------------------------------------------------------------------------
# Control plane


class ControlPlane:
    """Broadcasts rank 0's decisions and agrees on per-job flags, over the gloo group.

    Every call is bounded by the group's timeout; a failure (a peer's socket closed, or the timeout)
    becomes ControlPlaneLost, which no job-level handler swallows.
    """

    def __init__(self, d: Dist) -> None:
        self.d = d

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as exc:  # gloo: "Connection closed by peer", "Timed out waiting ..."
            raise ControlPlaneLost(
                f"the control plane failed during {what} (a rank is dead or stuck): {_first_line(exc)}"
            ) from exc

    def broadcast(self, message: Any, what: str = "a broadcast", after_job: bool = False) -> Any:
        """Rank 0's message to every rank; `after_job` waits up to the collective timeout."""
        if self.d.world_size == 1:
            return message
        box = [message if self.d.is_main else None]
        group = self.d.control_after_job if after_job else self.d.control
        self._call(what, lambda: dist.broadcast_object_list(box, src=0, group=group))
        return box[0]

    def any_flags(
        self, failed: bool, cancel: bool, what: str = "an agreement", after_job: bool = False
    ) -> tuple[bool, bool]:
        """MAX over ranks of (failed, cancel); `after_job` waits up to the collective timeout."""
        flags = torch.tensor([int(failed), int(cancel)], dtype=torch.int32)
        if self.d.world_size > 1:
            group = self.d.control_after_job if after_job else self.d.control
            self._call(what, lambda: dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group))
        return bool(flags[0]), bool(flags[1])

    def max_peak_memory(self, peak: PeakMemory | None) -> PeakMemory | None:
        """The job's peak GPU memory, the maximum over ranks (every rank calls this after a job that
        every rank finished; None where no rank measured one: the CPU)."""
        values = torch.tensor([-1.0, -1.0] if peak is None else [peak.allocated_mb, peak.reserved_mb])
        if self.d.world_size > 1:
            group = self.d.control_after_job
            self._call("the peak-memory reduction", lambda: dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group))
        allocated, reserved = values.tolist()
        return None if reserved < 0 else PeakMemory(allocated, reserved)

    def gather_errors(self, error: str | None) -> list[str | None]:
        """Every rank's error text, on rank 0 (an empty list elsewhere)."""
        return self.gather_objects(error, "gathering errors")

    def gather_objects(self, obj: Any, what: str) -> list[Any]:
        """Every rank's `obj` (small, picklable), on rank 0 (an empty list elsewhere)."""
        if self.d.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.d.world_size if self.d.is_main else []
        self._call(what, lambda: dist.gather_object(obj, out if self.d.is_main else None, dst=0, group=self.d.control))
        return out


class JobAgreement:
    """The per-step control the pipeline sees: all ranks go on, or all stop at the same step.

    A rank that fails on its own (an exception outside any agreement) reports it at `finish`; its
    peers meet that report at their next step agreement (or their own `finish`), because both use
    the same all-reduce on the same group: the job group, bounded by the collective timeout like
    every other collective inside a job (rank 0 decodes and writes the mp4 before its `finish`).
    The first agreement that shows a failure or a cancellation ends the job on every rank, so each
    rank enters exactly the same collectives.
    """

    def __init__(self, plane: ControlPlane, cancelled: Callable[[], bool]) -> None:
        self.plane = plane
        self.cancelled = cancelled
        self.ended = False

    def __call__(self, step: int, total: int, stage: str = "step") -> bool:
        """Before denoising step `step` (stage "step"), or after chunk `step` of the I2V condition's
        encode (stage "encode") or of the decode (stage "decode")."""
        cancel = self.plane.d.is_main and self.cancelled()
        failed, cancel = self.plane.any_flags(False, cancel, f"{stage} {step}", after_job=True)
        if failed:
            self.ended = True
            raise PeerFailed(f"another rank failed before {stage} {step}")
        if cancel:
            self.ended = True
            return False
        return True

    def agree_compute(self, step: int, compute: bool) -> bool:
        """The step cache's decision for `step`, agreed: compute when any rank wants to. The same
        (failed, flag) all-reduce as a step's, so a peer's failure report met here ends the job alike."""
        failed, compute = self.plane.any_flags(False, compute, f"step {step}'s cache decision", after_job=True)
        if failed:
            self.ended = True
            raise PeerFailed(f"another rank failed before step {step}")
        return compute

    def finish(self, failed: bool) -> bool:
        """Agree at the end of the job; True if any rank failed (or an earlier agreement ended it).

        Rank 0 gets here only after decoding and writing the mp4, so the others wait up to the
        collective timeout, not the control timeout."""
        if self.ended:
            return True
        any_failed, _ = self.plane.any_flags(failed, False, "the end of a job", after_job=True)
        return any_failed


def _job_failed(job: Job, rank: int, exc: Exception) -> str:
    """Log a job's failure on this rank (with its traceback) and return the error to report."""
    log.error("job %s failed on rank %d: %s: %s", job.id, rank, type(exc).__name__, exc, exc_info=True)
    return f"{type(exc).__name__}: {exc}"


def run_agreed(
    plane: ControlPlane, job: Job, run_job: RunJob, source: JobSource | None, output: Path | None
) -> Outcome:
    """Run one job on this rank; every rank returns after the same collectives."""
    agreement = JobAgreement(plane, (lambda: source.check_stop(job)) if source else (lambda: False))
    on_step = (lambda i, n: source.on_step(job, i, n)) if source else (lambda i, n: None)
    report, error, local_failed, cancelled = None, None, False, False
    try:
        report = run_job(job, agreement, on_step, output)
    except JobCancelled as exc:
        error, cancelled = str(exc), True
    except PeerFailed:
        pass
    except ControlPlaneLost:  # the ranks cannot agree any more: this ends the loop, not just the job
        raise
    except Exception as exc:  # a job's failure must not end the loop
        error, local_failed = _job_failed(job, plane.d.rank, exc), True
    if cancelled:
        return Outcome.settle(job, stopped=True, error=error)
    any_failed = agreement.finish(local_failed)
    if not any_failed and report is not None:
        outcome = Outcome.settle(job, video_path=report.video_path, timings_ms=report.timings_ms)
        # every rank is here (the agreement said none failed); the CPU has no peak to reduce
        if plane.d.device.type != "cpu":
            outcome.peak_memory = plane.max_peak_memory(report.peak_memory)
        return outcome
    errors = plane.gather_errors(error if local_failed else None)
    if not plane.d.is_main:
        return Outcome.settle(job, error=error or "failed on another rank")
    described = [f"rank {r}: {e}" if plane.d.world_size > 1 else e for r, e in enumerate(errors) if e]
    # rank 0 alone: a failure while stopping (ffmpeg killed by the same signal) is that stop
    return Outcome.settle(job, error="; ".join(described) or "failed", shutdown=source.stop_reason if source else None)


def spmd_loop(d: Dist, run_job: RunJob, source: JobSource | None, heartbeat_s: float = 5.0) -> int:
    """Run jobs until rank 0's source says stop; returns how many jobs ran.

    Rank 0 takes a job from `source` (or sends a heartbeat after `heartbeat_s` idle) and broadcasts
    it; every rank runs it; rank 0 hands the outcome to the source. A reply is always sent.
    `heartbeat_s` must be well inside the control timeout, which bounds the other ranks' wait.
    Raises ControlPlaneLost when a peer is dead or stuck (within the control timeout).
    """
    if d.is_main and source is None:
        raise ValueError("rank 0 needs a job source")
    plane = ControlPlane(d)
    count = 0
    after_job = False
    while True:
        message: Any = None
        if d.is_main:
            # Right after a job, answer at once (a job or a heartbeat): the others' wait for this
            # message is bounded by the collective timeout, which need not cover a heartbeat period.
            item = source.next_job(0.0 if after_job else heartbeat_s)
            message = ("stop", None) if item is StopLoop else ("heartbeat", None) if item is None else ("job", item)
        what = f"the {message[0]} broadcast" if d.is_main else "the wait for rank 0's next message"
        kind, job = plane.broadcast(message, what, after_job=after_job)
        after_job = kind == "job"
        if kind in ("stop", "heartbeat"):
            # gloo's broadcast can return on rank 0 before anyone received it (the bytes wait in a
            # socket buffer), so every rank also joins an all-reduce: a stuck or dead peer makes
            # it fail on every live rank within the control timeout, and stop is known to be heard.
            plane.any_flags(False, False, f"the {kind} agreement")
            if kind == "stop":
                return count
            continue
        start = time.perf_counter()
        output = source.output_path(job) if d.is_main else None
        outcome = run_agreed(plane, job, run_job, source if d.is_main else None, output)
        count += 1
        if d.is_main:
            outcome.job_ms = (time.perf_counter() - start) * 1000.0
            try:
                source.finish(outcome)
            except Exception:  # delivery trouble (disk full, client gone) must not end the loop
                log.exception("could not deliver the outcome of job %s", job.id)
