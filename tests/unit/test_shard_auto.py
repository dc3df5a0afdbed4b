"""`--shard-index auto` / `--num-shards auto`: the shard a scheduler's task takes, read from the
variables Slurm arrays and Kubernetes Indexed Jobs set (no processes; the scripts and manifests
that rely on it run in tests/e2e/test_deploy.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wan_spmd.batch import Shard, check_args

# What Slurm sets in task 3 of `sbatch --array=0-7`.
SLURM_TASK_3 = {
    "SLURM_ARRAY_TASK_ID": "3",
    "SLURM_ARRAY_TASK_COUNT": "8",
    "SLURM_ARRAY_TASK_MIN": "0",
    "SLURM_ARRAY_TASK_MAX": "7",
    "SLURM_ARRAY_JOB_ID": "1234",
}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    requests = tmp_path / "r.jsonl"
    requests.write_text("")
    return requests, tmp_path / "out"


def test_slurm_array_gives_index_and_count(files):
    """A Slurm array task must take its own shard and the array's size, and say where it read them;
    if this fails, every task of an array runs the same shard (or the whole batch)."""
    shard = check_args(*files, "auto", "auto", env=SLURM_TASK_3)
    assert shard == Shard(3, 8)
    assert shard.source == "SLURM_ARRAY_TASK_ID=3, SLURM_ARRAY_TASK_COUNT=8"
    assert shard.results_name == "results-3-of-8.jsonl"
    # A resubmitted task (`--array=3` alone) with the count given: the id still names the shard.
    rerun = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "3"}
    assert check_args(*files, "auto", "8", env=rerun) == Shard(3, 8)
    assert check_args(*files, "AUTO", 8, env=SLURM_TASK_3) == Shard(3, 8)
    assert check_args(*files, "5", "auto", env=SLURM_TASK_3) == Shard(5, 8)


def test_kubernetes_indexed_job_gives_index(files):
    """An Indexed Job pod must take shard JOB_COMPLETION_INDEX of the --num-shards it is given."""
    shard = check_args(*files, "auto", "4", env={"JOB_COMPLETION_INDEX": "2"})
    assert shard == Shard(2, 4) and shard.source == "JOB_COMPLETION_INDEX=2"


def test_slurm_wins_over_kubernetes_and_says_so(files):
    """Both kinds set (a job sbatch'ed from a pod inherits the pod's JOB_COMPLETION_INDEX): the Slurm
    task's own id must win, and the log must say the other was ignored."""
    shard = check_args(*files, "auto", "auto", env={**SLURM_TASK_3, "JOB_COMPLETION_INDEX": "0"})
    assert shard == Shard(3, 8)
    assert "JOB_COMPLETION_INDEX=0 ignored" in shard.source


@pytest.mark.parametrize(
    ("index", "count", "env", "message"),
    [
        # nothing set: the one line names both variables and the way out
        ("auto", "4", {}, "neither SLURM_ARRAY_TASK_ID (a Slurm array task) nor JOB_COMPLETION_INDEX"),
        ("auto", "auto", {"SLURM_JOB_ID": "9"}, "give --shard-index I"),
        ("0", "auto", {}, "SLURM_ARRAY_TASK_COUNT (a Slurm array job) is not set"),
        # Kubernetes says no count: the Job's completions must be written out
        ("auto", "auto", {"JOB_COMPLETION_INDEX": "1"}, "spec.completions"),
        # arrays whose ids are not 0..K-1 would leave a shard undone (1-8) or skip some (0-14:2)
        ("auto", "auto", {**SLURM_TASK_3, "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"}, "run 1..8"),
        ("auto", "auto", {**SLURM_TASK_3, "SLURM_ARRAY_TASK_MAX": "14"}, "--array=0-7"),
        # an index past the count, with the variable it came from
        ("auto", "2", {"JOB_COMPLETION_INDEX": "2"}, "within 0..1 for --num-shards 2, got 2 (JOB_COMPLETION_INDEX=2)"),
        ("auto", "auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "0"}, "at least 1"),
        ("auto", "4", {"JOB_COMPLETION_INDEX": "one"}, "JOB_COMPLETION_INDEX='one' is not a whole number"),
        ("x", "4", {}, "--shard-index must be a whole number or auto, got 'x'"),
        ("0", "four", {}, "--num-shards must be a whole number or auto"),
        ("auto", None, SLURM_TASK_3, "together"),
    ],
)
def test_refusals_are_one_line(files, index, count, env, message):
    """Each way `auto` cannot work must be one line that says why (the CLI exits 2 with it)."""
    with pytest.raises(ValueError) as info:
        check_args(*files, index, count, env=env)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
