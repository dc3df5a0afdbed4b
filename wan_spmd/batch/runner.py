"""The batch runner: rank 0's `JobSource` over a JSONL file, and its front.

Rank 0 alone reads the file and writes the results; the other ranks only run the jobs the SPMD
loop broadcasts. Lines are validated only when the loop asks for the next job, so a bad line is
recorded as failed and never reaches the other ranks. Each line's outcome is appended to the
results log before the next job starts, after its video has been renamed into place: a crash loses
at most the job in flight, and a rerun skips exactly the jobs whose video and ok line both exist.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wan_spmd.batch.lines import Entry, iter_entries, output_path, validate_line
from wan_spmd.batch.results import ResultsLog, is_done, read_done, remove_stale_parts
from wan_spmd.batch.shards import Shard
from wan_spmd.jobs import Job, OfflineFront, Outcome, SourceBase, StopLoop
from wan_spmd.params import Limits, RequestError

if TYPE_CHECKING:
    from tqdm import tqdm

    from wan_spmd.config import ModelInfo

log = logging.getLogger("wan_spmd.batch")


@dataclass
class Summary:
    """What the batch did this run."""

    ok: int = 0
    failed: int = 0
    interrupted: int = 0
    """Lines stopped by SIGTERM/SIGINT (recorded; a rerun does them)."""
    duplicates: int = 0
    already_done: int = 0
    video_s: list[float] = field(default_factory=list)
    """Wall time of each video made this run, from broadcast to mp4 in place."""
    started: float | None = None
    ended: float | None = None

    @property
    def skipped(self) -> int:
        return self.duplicates + self.already_done

    def line(self) -> str:
        total_s = (self.ended or time.perf_counter()) - (self.started or time.perf_counter())
        mean = f"{sum(self.video_s) / len(self.video_s):.1f} s" if self.video_s else "-"
        return (
            f"batch: {self.ok} ok, {self.failed} failed, "
            + (f"{self.interrupted} interrupted, " if self.interrupted else "")
            + f"{self.skipped} skipped "
            f"({self.already_done} done earlier, {self.duplicates} duplicate); "
            f"total {total_s:.1f} s, mean {mean} per video"
        )


class BatchSource(SourceBase):
    """Feeds a JSONL file's lines to the SPMD loop one job at a time, on rank 0 only.

    Built before the process group starts: it reads what earlier runs finished and counts this
    shard's work (for the progress bar's ETA); lines are validated as the loop asks for them.
    """

    def __init__(
        self,
        requests: Path,
        out_dir: Path,
        *,
        info: ModelInfo,
        defaults: Mapping[str, Any],
        limits: Limits = Limits(),
        shard: Shard = Shard(),
        progress: bool = True,
    ) -> None:
        self.requests = requests
        self.base_dir = requests.resolve().parent  # relative image paths are relative to the file
        self.out_dir = out_dir
        self.info = info
        self.defaults = dict(defaults)
        self.limits = limits
        self.shard = shard
        self.progress = progress
        self.summary = Summary()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = out_dir / shard.results_name
        self._done = read_done(out_dir)
        self.to_run = self._count_work()
        """This shard's lines that are not already finished: the progress bar's total."""
        self._entries = (e for e in iter_entries(requests) if shard.owns(e))
        self._seen: dict[str, Entry] = {}
        self._claimed: dict[str, Entry] = {}
        self._log: ResultsLog | None = None
        self._bar: tqdm | None = None
        self._current: Entry | None = None
        self._job_started = 0.0
        self.stop_reason: str | None = None
        """Set from the shutdown watch's thread: the running job stops at its next step, no new one starts."""

    def _count_work(self) -> int:
        count, seen = 0, set()
        for entry in iter_entries(self.requests):
            if not self.shard.owns(entry):
                continue
            first = entry.id not in seen
            seen.add(entry.id)
            if not (first and is_done(entry, self._done, self.out_dir)):
                count += 1
        return count

    # -- JobSource ---------------------------------------------------------------------------
    def next_job(self, timeout: float) -> Job | None | type[StopLoop]:
        """The next runnable line; bad ones are recorded on the way. Returns None once `timeout` has
        passed without a job, so the loop's heartbeat reaches the waiting ranks in time."""
        self._start()
        deadline = time.monotonic() + timeout
        for entry in self._entries:
            if self.stop_reason is not None:
                break
            job_or_reason = self._prepare(entry)
            if isinstance(job_or_reason, Job):
                self._current, self._job_started = entry, time.perf_counter()
                return job_or_reason.start()
            if time.monotonic() > deadline:
                return None
        self.close()
        return StopLoop

    def output_path(self, job: Job) -> Path:
        assert job.output is not None
        return self.out_dir / job.output

    def on_step(self, job: Job, step: int, total: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"line {job.line} step {step}/{total}", refresh=True)

    def finish(self, outcome: Outcome) -> None:
        """The engine has put the verified video in place; record its ok line (or why not)."""
        job = outcome.job
        entry = self._current
        assert entry is not None, "finish without a job from next_job"
        if outcome.status == "deadline":
            self._record(entry, "failed", error=outcome.stop.reason)
            return
        if outcome.stop is not None:  # SIGTERM/SIGINT: the rerun does this line
            self._record(entry, "interrupted", error=f"{outcome.stop.reason}: {outcome.error}")
            return
        if not outcome.ok:
            self._record(entry, "failed", error=outcome.error or "failed")
            return
        params = job.params
        elapsed = time.perf_counter() - self._job_started
        self.summary.video_s.append(elapsed)
        self._record(
            entry,
            "ok",
            timings_ms={k: round(v, 1) for k, v in outcome.timings_ms.items()},
            # peak GPU memory (MiB, max over ranks); null on the CPU
            **(outcome.peak_memory.fields() if outcome.peak_memory else {"peak_memory_mb": None}),
            job_s=round(elapsed, 3),
            seed=params.seed,
            size=params.size,
            num_frames=params.num_frames,
            fps=params.fps,
            num_inference_steps=params.num_inference_steps,
            warnings=list(params.warnings),
        )

    # -- helpers -----------------------------------------------------------------------------
    def _start(self) -> None:
        if self.summary.started is not None:
            return
        from tqdm import tqdm

        self.summary.started = time.perf_counter()
        self._log = ResultsLog(self.results_path)
        self._bar = tqdm(
            total=self.to_run,
            desc="batch",
            unit="video",
            file=sys.stderr,
            disable=not self.progress or self.to_run == 0,
        )

    def close(self) -> None:
        if self.summary.ended is None:
            self.summary.ended = time.perf_counter()
        if self._bar is not None:
            if self.stop_reason is not None and not self._bar.disable:  # say why it ends short
                self._bar.set_postfix_str(self.stop_reason, refresh=True)
            self._bar.close()
        if self._log is not None:
            self._log.close()

    def _prepare(self, entry: Entry) -> Job | str:
        """A Job for the line, or the reason it was recorded instead (failed or skipped)."""
        if entry.error is not None:
            return self._record(entry, "failed", error=entry.error)
        assert entry.id is not None and entry.request is not None and entry.output is not None
        first = self._seen.get(entry.id)
        if first is not None:
            if first.params_hash == entry.params_hash:
                return self._record(entry, "skipped", note=f"duplicate of line {first.line}")
            return self._record(
                entry, "failed", error=f"id {entry.id!r} is already used by line {first.line} with different parameters"
            )
        self._seen[entry.id] = entry
        owner = self._claimed.get(str(entry.output))
        if owner is not None:
            return self._record(
                entry, "failed", error=f"output {str(entry.output)!r} is already used by line {owner.line}"
            )
        self._claimed[str(entry.output)] = entry
        if is_done(entry, self._done, self.out_dir):
            self.summary.already_done += 1
            return "done earlier"  # its ok line is in the results already; not counted on the bar
        try:
            path = output_path(self.out_dir, entry.output)
            params = self._validate(entry.request)
        except RequestError as exc:
            return self._record(entry, "failed", error=str(exc))
        except Exception as exc:  # never expected; still this line's failure, not the batch's
            log.error("line %d: validation failed unexpectedly", entry.line, exc_info=True)
            return self._record(entry, "failed", error=f"cannot be validated ({type(exc).__name__}: {exc})")
        remove_stale_parts(path)  # a run killed mid-write left these; this job's rerun replaces them
        return Job(entry.id, params, line=entry.line, output=str(entry.output))

    def _validate(self, request: dict[str, Any]) -> Any:
        return validate_line(request, self.base_dir, self.info, self.defaults, self.limits)

    def _record(self, entry: Entry, status: str, **fields: Any) -> str:
        """Append the line's result and count it; returns a short reason for the caller."""
        assert self._log is not None
        record = {
            "id": entry.id,
            "line": entry.line,
            "status": status,
            "output": str(entry.output) if status == "ok" else None,
            "error": fields.pop("error", None),
            **fields,
            "params_hash": entry.params_hash,
        }
        self._log.append(record)
        if status == "ok":
            self.summary.ok += 1
        elif status in ("failed", "interrupted"):
            if status == "failed":
                self.summary.failed += 1
            else:
                self.summary.interrupted += 1
            self._write(f"line {entry.line}: {status}: {record['error']}")
        else:
            self.summary.duplicates += 1
        if self._bar is not None and status != "interrupted":  # not done: the rerun does it
            self._bar.update(1)
        return status

    def _write(self, message: str) -> None:
        if self._bar is not None and not self._bar.disable:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)


WARMUP_SHAPES = 2
"""Two shapes warm a compiled block for every size (the second compiles it with a dynamic sequence)."""


def first_shapes(
    requests: Path, info: ModelInfo, defaults: Mapping[str, Any], limits: Limits, shard: Shard
) -> tuple[tuple[int, int, int], ...]:
    """The first distinct (width, height, frames) among this shard's valid lines, at most
    `WARMUP_SHAPES` of them: what a compiled batch warms up with. Lines that do not validate are
    passed over here (the run records them)."""
    shapes: dict[tuple[int, int, int], None] = {}
    base_dir = requests.resolve().parent
    for entry in iter_entries(requests):
        if len(shapes) == WARMUP_SHAPES:
            break
        if entry.error is not None or entry.request is None or not shard.owns(entry):
            continue
        try:
            params = validate_line(entry.request, base_dir, info, defaults, limits)
        except Exception:  # RequestError or worse: the run records it, in its turn
            continue
        shapes[(params.width, params.height, params.num_frames)] = None
    return tuple(shapes)


class BatchFront(OfflineFront):
    """Rank 0's side of `batch`: exit 1 if a line failed or the run was interrupted, so Slurm and
    Kubernetes indexed Jobs never mark a preempted shard complete."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source

    def warmup_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """The first two shapes of this shard's file, on rank 0 alone (validating reads images)."""
        s = self.source
        return first_shapes(s.requests, s.info, s.defaults, s.limits, s.shard)

    def stopped(self, lost: bool) -> None:
        self.source.close()

    def exit_code(self, jobs: int, signal_name: str | None) -> int:
        summary = self.source.summary
        return 1 if summary.failed or summary.interrupted or self.source.stop_reason else 0
