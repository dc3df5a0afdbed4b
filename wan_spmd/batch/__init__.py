"""The `batch` front: jobs from a JSONL file, resumable and shardable.

    lines.py    a line: parsed up front (JSON, id, output name), validated when its turn comes
    shards.py   the command's arguments and shards (Slurm / Kubernetes `auto`), colliding outputs
    results.py  the results log and resume (what earlier runs finished)
    runner.py   rank 0's JobSource over the file, and the command's front

Nothing here imports torch at import time, so the CLI can check its arguments (`check_args`,
`check_shared_outputs`) before torch loads.
"""

from wan_spmd.batch.lines import (
    FINGERPRINT_KEYS,
    ID_HEX_CHARS,
    MAX_NAME_CHARS,
    Entry,
    default_output_name,
    derive_id,
    fingerprint,
    iter_entries,
    output_path,
    safe_output_name,
    scan_line,
    validate_line,
)
from wan_spmd.batch.results import ResultsLog, is_done, read_done, remove_stale_parts
from wan_spmd.batch.runner import WARMUP_SHAPES, BatchFront, BatchSource, Summary, first_shapes
from wan_spmd.batch.shards import (
    AUTO,
    K8S_INDEX,
    SLURM_COUNT,
    SLURM_INDEX,
    SLURM_MAX,
    SLURM_MIN,
    Shard,
    check_args,
    check_shared_outputs,
    scheduler_shard,
    shard_of,
)

__all__ = [
    "AUTO",
    "FINGERPRINT_KEYS",
    "ID_HEX_CHARS",
    "K8S_INDEX",
    "MAX_NAME_CHARS",
    "SLURM_COUNT",
    "SLURM_INDEX",
    "SLURM_MAX",
    "SLURM_MIN",
    "WARMUP_SHAPES",
    "BatchFront",
    "BatchSource",
    "Entry",
    "ResultsLog",
    "Shard",
    "Summary",
    "check_args",
    "check_shared_outputs",
    "default_output_name",
    "derive_id",
    "fingerprint",
    "first_shapes",
    "is_done",
    "iter_entries",
    "output_path",
    "read_done",
    "remove_stale_parts",
    "safe_output_name",
    "scan_line",
    "scheduler_shard",
    "shard_of",
    "validate_line",
]
