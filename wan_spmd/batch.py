"""The `batch` front: jobs from a JSONL file, resumable and shardable (issue 7).

Rank 0 alone reads the file and writes the results; the other ranks only run the jobs the SPMD
loop broadcasts. A line is parsed cheaply up front (JSON, id, output name: enough to count this
shard's work and to know what a previous run finished), and validated only when the loop asks for
the next job, so a bad line is recorded as failed and never reaches the other ranks.

Each line's outcome is appended to `OUT/results.jsonl` (`results-I-of-K.jsonl` for a shard) and
flushed before the next job starts, after its video has been renamed into place: a crash loses at
most the job in flight, and a rerun skips exactly the jobs whose video and ok line both exist.

This module imports torch only inside `BatchSource`'s methods, so the CLI can check its arguments
(`check_args`) before torch loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from wan_spmd.jobs import Job, OfflineFront, Outcome, SourceBase, StopLoop
from wan_spmd.params import PARAM_KEYS, GenerationParams, Limits, RequestError, read_image_file, resolve_params

if TYPE_CHECKING:
    from tqdm import tqdm

    from wan_spmd.config import ModelInfo

# What a line's derived id and its fingerprint cover: the generation parameters, the image path as
# written and the output name. Not `id` (it is what we derive) and not unknown keys (ignored).
FINGERPRINT_KEYS = (*PARAM_KEYS, "image", "output")
ID_HEX_CHARS = 16  # 64 bits: collisions among a batch's lines are out of reach
MAX_NAME_CHARS = 200  # per path component, under every filesystem's 255-byte limit for ASCII

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Arguments and shards


@dataclass(frozen=True)
class Shard:
    """Which part of the batch this run takes: lines whose id hashes to `index` modulo `count`."""

    index: int = 0
    count: int = 1
    source: str = field(default="", compare=False)
    """Where `auto` took its numbers from, for the log (empty when both were given)."""

    @property
    def results_name(self) -> str:
        return "results.jsonl" if self.count == 1 else f"results-{self.index}-of-{self.count}.jsonl"

    def owns(self, entry: Entry) -> bool:
        return shard_of(entry, self.count) == self.index


# Where a scheduler tells a task its place in a fanned-out batch. When both kinds are set, Slurm's
# win: Slurm sets its variables for the very task it starts, while sbatch hands the submitting
# shell's whole environment to the job, so a JOB_COMPLETION_INDEX seen beside them was inherited
# (from a pod that submitted the job); nothing copies Slurm's variables into a pod.
SLURM_INDEX, SLURM_COUNT = "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"
SLURM_MIN, SLURM_MAX = "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX"
K8S_INDEX = "JOB_COMPLETION_INDEX"  # Kubernetes Indexed Job; no variable carries its completions
AUTO = "auto"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    """A whole number from the environment; None when unset, ValueError (one line) when malformed."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None


def scheduler_shard(
    env: Mapping[str, str], *, want_index: bool, want_count: bool
) -> tuple[int | None, int | None, str]:
    """`--shard-index auto` / `--num-shards auto` from a Slurm array task's or a Kubernetes Indexed
    Job pod's variables: (index or None, count or None, which variables were used)."""
    slurm_index, k8s_index = _env_int(env, SLURM_INDEX), _env_int(env, K8S_INDEX)
    used, index, count = [], None, None
    if want_index:
        if slurm_index is not None:
            index = slurm_index
            used.append(f"{SLURM_INDEX}={slurm_index}")
            if k8s_index is not None:
                used.append(f"{K8S_INDEX}={k8s_index} ignored: Slurm's variables win")
        elif k8s_index is not None:
            index = k8s_index
            used.append(f"{K8S_INDEX}={k8s_index}")
        else:
            raise ValueError(
                f"--shard-index auto: neither {SLURM_INDEX} (a Slurm array task) nor {K8S_INDEX} "
                "(a Kubernetes Indexed Job) is set; give --shard-index I"
            )
    if want_count:
        count = _env_int(env, SLURM_COUNT)
        if count is None:
            if k8s_index is not None and slurm_index is None:
                raise ValueError(
                    f"--num-shards auto: a Kubernetes Indexed Job puts no count in the environment "
                    f"({K8S_INDEX} only); give --num-shards equal to the Job's spec.completions"
                )
            raise ValueError(f"--num-shards auto: {SLURM_COUNT} (a Slurm array job) is not set; give --num-shards K")
        used.append(f"{SLURM_COUNT}={count}")
        if want_index and slurm_index is not None:
            # Both from the array: its task ids must be exactly 0..count-1, or a shard would never
            # run (--array=1-8 leaves shard 0 undone). Slurm sets MIN and MAX for every array task.
            low, high = _env_int(env, SLURM_MIN), _env_int(env, SLURM_MAX)
            if (low is not None and low != 0) or (high is not None and high != count - 1):
                shown = "..".join("?" if x is None else str(x) for x in (low, high))
                raise ValueError(
                    f"--num-shards auto: the Slurm array's task ids run {shown} for {count} tasks, "
                    f"not 0..{count - 1}; submit with --array=0-{count - 1} or give --num-shards"
                )
    return index, count, ", ".join(used)


def _shard_number(flag: str, value: int | str | None) -> int | str | None:
    """An int, `auto`, or None; the CLI passes text so that `auto` gets through typer."""
    if value is None or isinstance(value, int):
        return value
    if value.strip().lower() == AUTO:
        return AUTO
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{flag} must be a whole number or auto, got {value!r}") from None


def check_args(
    requests: Path,
    output_dir: Path,
    shard_index: int | str | None,
    num_shards: int | str | None,
    env: Mapping[str, str] | None = None,
) -> Shard:
    """The batch command's own arguments; a ValueError here exits 2 before torch loads. `auto` for
    either shard number reads the scheduler's variables from `env` (the process's by default)."""
    if not requests.exists():
        raise ValueError(f"requests file {requests} does not exist")
    if not requests.is_file():
        raise ValueError(f"requests file {requests} is not a file")
    if not os.access(requests, os.R_OK):
        raise ValueError(f"requests file {requests} is not readable")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} exists and is not a folder")
    existing = next(p for p in (output_dir.absolute(), *output_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output-dir {output_dir}: cannot write in {existing}")
    index, count = _shard_number("--shard-index", shard_index), _shard_number("--num-shards", num_shards)
    if (index is None) != (count is None):
        raise ValueError("give --shard-index and --num-shards together (or neither)")
    if index is None or count is None:
        return Shard()
    source = ""
    if AUTO in (index, count):
        auto_index, auto_count, source = scheduler_shard(
            os.environ if env is None else env, want_index=index == AUTO, want_count=count == AUTO
        )
        index = auto_index if index == AUTO else index
        count = auto_count if count == AUTO else count
    assert isinstance(index, int) and isinstance(count, int)
    if count < 1:
        raise ValueError(f"--num-shards must be at least 1, got {count}" + (f" ({source})" if source else ""))
    if not 0 <= index < count:
        raise ValueError(
            f"--shard-index must be within 0..{count - 1} for --num-shards {count}, got {index}"
            + (f" ({source})" if source else "")
        )
    shard = Shard(index, count, source)
    if source:
        log.info("batch: shard %d of %d (%s)", index, count, source)
    return shard


# ---------------------------------------------------------------------------------------------
# Lines: ids, fingerprints, output names


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def fingerprint(request: Mapping[str, Any]) -> str:
    """A hash of what a line asks for, independent of key order and of blank values (which the schema
    treats as absent), so an unchanged line keeps it across runs. The image is hashed as a path as
    written, not its content: moving the JSONL file with its images keeps every id."""
    picked = {k: request[k] for k in FINGERPRINT_KEYS if k in request and not _is_blank(request[k])}
    canonical = json.dumps(picked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a lone surrogate (JSON "\ud800") still hashes; validation refuses it later
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def derive_id(params_hash: str) -> str:
    return params_hash[:ID_HEX_CHARS]


def safe_output_name(value: Any) -> PurePosixPath:
    """An `output` from a line as a path relative to OUT, refused (never rewritten) if it could leave
    OUT or clash with our own files: absolute, `..`, hidden or empty parts, backslashes, control
    characters, or not an .mp4. Subfolders (`shots/a.mp4`) are fine."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError("output must be a non-empty file name such as clip.mp4", "output")
    if "\\" in value or any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise RequestError(
            f"output {_escaped(value)} has a backslash, a control character or a lone surrogate", "output"
        )
    if value.startswith("/"):
        raise RequestError(f"output {value!r} is absolute; give a name relative to --output-dir", "output")
    parts = value.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise RequestError(
                f"output {value!r} has an empty, '.' or '..' part; it must stay in --output-dir", "output"
            )
        if part.startswith("."):
            raise RequestError(f"output {value!r} has a hidden part {part!r}", "output")
        if len(part) > MAX_NAME_CHARS:
            raise RequestError(f"output {value!r} has a part over {MAX_NAME_CHARS} characters", "output")
    if not parts[-1].endswith(".mp4") or parts[-1] == ".mp4":
        raise RequestError(f"output {value!r} must be an .mp4 file name", "output")
    return PurePosixPath(*parts)


def default_output_name(job_id: str) -> PurePosixPath:
    """`{id}.mp4`, with any character of an explicit id that is not safe in a file name made `_`."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", job_id).lstrip(".")[:MAX_NAME_CHARS] or "_"
    return PurePosixPath(f"{stem}.mp4")


def output_path(out_dir: Path, name: PurePosixPath) -> Path:
    """OUT/name, refused if a symlinked folder inside OUT would take it elsewhere."""
    path = out_dir / name
    root = out_dir.resolve()
    if not path.resolve().is_relative_to(root):
        raise RequestError(f"output {str(name)!r} leads outside --output-dir (through a symlink)", "output")
    return path


@dataclass(frozen=True)
class Entry:
    """One non-blank line, parsed but not yet validated."""

    line: int
    """1-based line number in the file (blank lines count)."""
    id: str | None = None
    """Explicit or derived; None when the line could not be parsed far enough to have one."""
    params_hash: str | None = None
    request: dict[str, Any] | None = None
    output: PurePosixPath | None = None
    error: str | None = None
    """Why the line cannot run, known before validation (not JSON, bad id or output)."""


def shard_of(entry: Entry, count: int) -> int:
    """By id, so identical lines and lines sharing an id land together (duplicates are found within a
    shard); a line without an id by its line number."""
    if count == 1:
        return 0
    if entry.id is None:
        return (entry.line - 1) % count
    return int(hashlib.sha256(entry.id.encode("utf-8", "surrogatepass")).hexdigest()[:16], 16) % count


def _escaped(value: Any, limit: int = 80) -> str:
    """A line's value in a message: repr'd (lone surrogates escaped), at most `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scan_line(line_no: int, raw: bytes) -> Entry | None:
    """Parse one line (None if blank): JSON, id, output name. No files are touched, and nothing a
    line holds can raise out of here: whatever is wrong with it becomes the entry's error."""
    try:
        return _scan_line(line_no, raw)
    except Exception as exc:  # a line must never stop the batch (nor its up-front count)
        return Entry(line_no, error=f"cannot be parsed ({type(exc).__name__}: {_escaped(str(exc))})")


def _scan_line(line_no: int, raw: bytes) -> Entry | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Entry(line_no, error=f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    text = text.lstrip("\ufeff").strip()
    if not text:
        return None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        return Entry(line_no, error=f"not JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return Entry(line_no, error="not JSON we read: nested too deeply")
    except ValueError as exc:  # an integer of more than 4300 digits
        return Entry(line_no, error=f"not JSON we read: {_escaped(str(exc))}")
    if not isinstance(request, dict):
        return Entry(line_no, error=f"not a JSON object but a {type(request).__name__}")
    params_hash = fingerprint(request)
    raw_id = request.get("id")
    if raw_id is None:
        job_id = derive_id(params_hash)
    elif (isinstance(raw_id, str) and raw_id.strip() and len(raw_id) <= MAX_NAME_CHARS) or (
        isinstance(raw_id, int) and not isinstance(raw_id, bool) and abs(raw_id) < 10**MAX_NAME_CHARS
    ):
        job_id = str(raw_id).strip()
    else:
        return Entry(
            line_no,
            request=request,
            error=f"id must be a non-empty string of at most {MAX_NAME_CHARS} characters, got {_escaped(raw_id)}",
        )
    entry = Entry(line_no, job_id, params_hash, request)
    try:
        output = safe_output_name(request["output"]) if "output" in request else default_output_name(job_id)
    except RequestError as exc:
        return dataclasses.replace(entry, error=str(exc))
    return dataclasses.replace(entry, output=output)


def iter_entries(path: Path) -> Iterator[Entry]:
    """The file's non-blank lines, one at a time (a huge batch is never held in memory)."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            entry = scan_line(line_no, raw)
            if entry is not None:
                yield entry


def check_shared_outputs(requests: Path, shard: Shard) -> None:
    """Refuse a sharded batch in which two lines of different shards name the same video (ids that
    map to one file name, `a_b` and `a/b`, or one explicit `output` twice): each shard would write
    it, and both would report ok. Every shard reads the whole file and gives the same one-line error
    (ValueError) before any work. Within one shard the second line is recorded as failed instead,
    as in an unsharded batch."""
    if shard.count == 1:
        return
    first: dict[str, Entry] = {}
    for entry in iter_entries(requests):
        if entry.output is None or entry.error is not None:
            continue
        other = first.setdefault(str(entry.output), entry)
        if other is not entry and shard_of(other, shard.count) != shard_of(entry, shard.count):
            raise ValueError(
                f"{requests}: lines {other.line} (id {_escaped(other.id, 40)}) and {entry.line} "
                f"(id {_escaped(entry.id, 40)}) both write {_escaped(str(entry.output), 60)}, in different "
                "shards; give one of them its own output"
            )


# ---------------------------------------------------------------------------------------------
# Results: what earlier runs finished, and appending this run's lines


def read_done(out_dir: Path) -> dict[str, set[tuple[str, str]]]:
    """id -> {(params_hash, output)} of every ok line in any results*.jsonl in OUT, whichever shard
    wrote it (a rerun with another --num-shards still skips finished work). A line cut short by a
    crash is not JSON and is passed over."""
    done: dict[str, set[tuple[str, str]]] = {}
    for results in sorted(out_dir.glob("results*.jsonl")):
        with results.open("rb") as f:
            for raw in f:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("status") == "ok" and record.get("id") is not None:
                    done.setdefault(str(record["id"]), set()).add(
                        (str(record.get("params_hash")), str(record.get("output")))
                    )
    return done


def is_done(entry: Entry, done: Mapping[str, set[tuple[str, str]]], out_dir: Path) -> bool:
    """Finished earlier: an ok line for the same id, parameters and output, and the video is there."""
    if entry.id is None or entry.output is None or entry.error is not None:
        return False
    if (entry.params_hash, str(entry.output)) not in done.get(entry.id, set()):
        return False
    return (out_dir / entry.output).is_file()


def remove_stale_parts(video: Path) -> list[Path]:
    """Delete the temporary files a run killed while writing `video` left beside it (the writer's
    own matcher, `video.stale_parts`, so another shard's video in flight is never touched)."""
    from wan_spmd.video import stale_parts

    removed = stale_parts(video)
    for part in removed:
        part.unlink(missing_ok=True)
    return removed


class ResultsLog:
    """Appends one JSON object per line, flushed and synced so a crash loses at most the job in
    flight. A last line cut short by an earlier crash is closed with a newline first, so the next
    line never joins it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("ab")
        if path.stat().st_size:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write(b"\n")

    def append(self, record: Mapping[str, Any]) -> None:
        try:
            data = json.dumps(record, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate from the line (its id): JSON's \u escape keeps it
            data = json.dumps(record, ensure_ascii=True).encode()
        self._file.write(data + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------------------------
# The job source


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
        if self._bar is not None:
            self._bar.update(1)
        return status

    def _write(self, message: str) -> None:
        if self._bar is not None and not self._bar.disable:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)


def validate_line(
    request: dict[str, Any], base_dir: Path, info: ModelInfo, defaults: Mapping[str, Any], limits: Limits
) -> GenerationParams:
    """The one schema (params.resolve_params), with the image read from a path beside the file."""
    if "input_reference" in request:
        raise RequestError(
            "a JSONL line gives its image as `image` (a file path), not input_reference", "input_reference"
        )
    image = None
    if not _is_blank(request.get("image")):
        raw = request["image"]
        if not isinstance(raw, str):
            raise RequestError(f"image must be a file path, got {_escaped(raw)}", "image")
        # `~...` and absolute paths as written; others relative to the JSONL file (read_file checks
        # the rest: NUL, unknown home folders, non-regular files, size before reading)
        path = raw if raw.startswith(("~", "/")) else str(base_dir / raw)
        image = read_image_file(path, max_bytes=limits.max_upload_bytes)
    params = resolve_params(request, info=info, defaults=defaults, limits=limits, image=image)
    if "model" in request:
        note = "ignored model: a batch runs the --model it was started with"
        params = dataclasses.replace(params, warnings=(*params.warnings, note))
    return params


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

    def stopped(self, lost: bool) -> None:
        self.source.close()

    def exit_code(self, jobs: int, signal_name: str | None) -> int:
        summary = self.source.summary
        return 1 if summary.failed or summary.interrupted or self.source.stop_reason else 0
