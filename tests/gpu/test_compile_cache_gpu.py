"""On a lent GPU machine: the compile cache with inductor's Triton kernels (CUDA), the path the CPU
test cannot take."""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_compile_cache import finish, start

pytestmark = pytest.mark.gpu


def test_second_process_reads_every_graph_from_the_cache(cache_home, tmp_path):
    """A second process with the same --compile-cache folder finds every graph there (FX graph and
    AOTAutograd entries, Triton kernels) and computes the same numbers. If this fails, a restarted
    GPU replica compiles again (a key that differs between runs, or kernels written elsewhere)."""
    folder = tmp_path / "cache"
    writer, _ = finish(start(folder, "cuda"))
    reader, _ = finish(start(folder, "cuda"))
    assert writer["graphs"] >= 1 and writer["cache_hits"] == 0, writer
    assert reader["graphs"] == reader["cache_hits"] == writer["graphs"], reader
    assert reader["checksum"] == writer["checksum"]
    key = json.loads((tmp_path / "cache" / reader["folder"].rsplit("/", 1)[1] / "key.json").read_text())
    assert key["device"].startswith("NVIDIA") and key["triton"], key
    assert any((tmp_path / "cache").rglob("triton/**/*.json"))  # Triton's kernels went there too
