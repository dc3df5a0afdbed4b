"""Weights on their way while torch imports: the model folder's safetensors files are handed to the
kernel's readahead before torch, diffusers and CUDA start (seconds on a GPU host), so the loaders'
reads find them in the page cache. Torch-free; safe because it only advises the kernel: nothing
is read into this process, and the loaders read the same files as before.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("wan_spmd")


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _advise(files: list[Path]) -> None:
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # the loader reports a missing or unreadable file in its own words
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def prefetch_weights(folder: Path | None, load_format: str = "auto") -> threading.Thread | None:
    """Ask the kernel to read the folder's weight files ahead, in a daemon thread; nothing for dummy
    weights, where fadvise is missing, or when the files would not fit in half the free memory (they
    would push each other out before the loaders get to them)."""
    if folder is None or load_format == "dummy" or not hasattr(os, "posix_fadvise"):
        return None
    files = sorted(Path(folder).glob("*/*.safetensors"))
    total = sum(p.stat().st_size for p in files if p.is_file())
    available = _available_bytes()
    if not files or (available is not None and total > available // 2):
        return None
    thread = threading.Thread(target=_advise, args=(files,), name="wan_spmd-prefetch", daemon=True)
    thread.start()
    return thread
