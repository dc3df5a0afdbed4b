"""This process as torchrun started it: its rank from the environment, its logging, its exit;
without torch, so bad arguments fail fast."""

from __future__ import annotations

import logging
import os
import sys
import time

_IMPORTED = time.monotonic()


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) without torchrun.
    ValueError naming the variable if one is not a whole number in its range (a hand-set RANK=abc)."""
    world_size = env_int("WORLD_SIZE", 1, low=1)
    rank = env_int("RANK", 0, low=0)
    if rank >= world_size:
        raise ValueError(f"environment variable RANK={rank} must be below WORLD_SIZE={world_size}")
    return rank, world_size, env_int("LOCAL_RANK", 0, low=0)


def env_int(name: str, default: int, low: int) -> int:
    """An environment variable holding a whole number >= `low` (ASCII digits only), or `default`
    when unset; ValueError quoting (the start of) what it holds otherwise."""
    text = os.environ.get(name)
    if text is None:
        return default
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or int(value) < low:
        raise ValueError(f"environment variable {name}={text[:40]!r} must be a whole number >= {low}")
    return int(value)


def process_age_s() -> float:
    """Seconds since this process started (Linux's /proc; elsewhere since this module was imported,
    which misses only the interpreter's own start)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def setup_logging(rank: int, level: str = "INFO") -> None:
    """One logger: rank 0 at INFO; other ranks only warnings and errors, with a rank prefix."""
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("wan_spmd")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(level if rank == 0 else "WARNING")


def finish_process(code: int) -> None:
    """End a rank of a multi-rank job without interpreter finalisation.

    Process-group objects still referenced by the sharded model (its DTensors hold the mesh) are
    otherwise destroyed during finalisation, after their worker threads, which aborts the process
    with SIGABRT ("terminate called without an active exception") once in a while. Everything we
    write is closed or flushed by then.
    """
    if torchrun_env()[1] > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
