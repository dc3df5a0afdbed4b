"""The compile cache across real processes: the tiny model's blocks compiled by inductor (on the
CPU, C++ kernels) into one `--compile-cache` folder by two processes at once, read back by a third,
and a corrupted copy survived by a fourth."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, cli_env

PROBE = Path(__file__).with_name("compile_cache_probe.py")


def start(folder: Path, device: str = "cpu") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(PROBE), str(folder), device],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=ROOT,
    )


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def test_shared_cache_two_writers_a_reader_and_a_corrupt_copy(cache_home, tmp_path):
    """Two processes compiling the same graphs into one folder both succeed and compute the same
    numbers; a third finds every graph in the cache (no fresh compile); beside it, a fourth reads a
    copy of the folder whose kernel files were all truncated: it warns, compiles again and still
    computes the same numbers. If this fails, ranks or replicas sharing a cache corrupt it, a
    restart compiles again, or a damaged cache stops a server from starting."""
    folder = tmp_path / "cache"
    writers = [start(folder), start(folder)]  # at once: the same entries written concurrently
    first, second = (finish(p)[0] for p in writers)
    assert first["folder"] == second["folder"] and Path(first["folder"]).parent == folder
    assert first["graphs"] == second["graphs"] == 1
    assert first["checksum"] == second["checksum"]

    # the reader on the folder and the survivor on a corrupted copy of it, at once
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    kernels = [p for p in (copy / Path(first["folder"]).name / "inductor").rglob("*") if p.suffix in (".so", ".py")]
    assert kernels
    for path in kernels:
        path.write_bytes(b"")
    reading, surviving = start(folder), start(copy)
    (reader, _), (survivor, err) = finish(reading), finish(surviving)
    assert reader["graphs"] == reader["cache_hits"] == 1, reader
    assert reader["checksum"] == first["checksum"] and reader["fell_back"] is None
    assert "1 from the cache" in reader["ready"]
    assert Path(survivor["folder"]).parent == copy
    assert survivor["fell_back"] and survivor["cache_hits"] == 0, survivor
    assert "could not be read" in err and "compiling again without it" in err
    assert survivor["checksum"] == first["checksum"]
