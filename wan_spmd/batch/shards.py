"""The batch command's arguments and its shards: which lines this run takes (by id, so lines that
share an id land together), `auto` from a Slurm array or a Kubernetes Indexed Job, and the check
that no two shards write one file."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wan_spmd.batch.lines import Entry, _escaped, iter_entries

log = logging.getLogger("wan_spmd.batch")


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


def shard_of(entry: Entry, count: int) -> int:
    """By id, so identical lines and lines sharing an id land together (duplicates are found within a
    shard); a line without an id by its line number."""
    if count == 1:
        return 0
    if entry.id is None:
        return (entry.line - 1) % count
    return int(hashlib.sha256(entry.id.encode("utf-8", "surrogatepass")).hexdigest()[:16], 16) % count


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
