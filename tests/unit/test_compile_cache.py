"""The compile cache's key and folder: every ingredient changes the key, and a folder that cannot be
used is a warning and a run without the cache, never a failed start-up."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from wan_spmd.compile_cache import (
    cache_key,
    default_compile_cache,
    key_digest,
    open_compile_cache,
    parse_compile_cache,
)

BASE = {
    "device": "NVIDIA H200 (sm90)",
    "layout": "tp=8",
    "family": "wan2.2-i2v-a14b",
    "dtype": "bfloat16",
    "attention": "fa3",
    "quant": "none",
    "backend": "inductor",
    "torch_version": "2.11.0+cu130",
    "cuda": "13.0",
    "triton": "3.5.0",
}
OTHER = {
    "device": "NVIDIA H100 80GB HBM3 (sm90)",
    "layout": "tp=4 cfg-parallel",
    "family": "wan2.2-ti2v-5b",
    "dtype": "float16",
    "attention": "sdpa",
    "quant": "fp8",
    "backend": "aot_eager",
    "torch_version": "2.13.0+cu130",
    "cuda": "12.8",
    "triton": "3.6.0",
}


@pytest.fixture(autouse=True)
def _keep_torch_settings(keep_compile_cache_settings):
    yield


@pytest.mark.parametrize("ingredient", sorted(BASE))
def test_each_ingredient_changes_the_key(ingredient):
    """A cache made by another torch, CUDA, Triton, GPU model, layout, family, dtype, attention
    backend, quant mode or compile backend lands in another subfolder. If this fails, a replica
    would read graphs compiled for something else (at best torch refuses them one by one)."""
    base = key_digest(cache_key(**BASE))
    changed = key_digest(cache_key(**{**BASE, ingredient: OTHER[ingredient]}))
    assert len(base) == 16 and changed != base
    assert key_digest(cache_key(**BASE)) == base  # and the same inputs give the same folder


def test_flag_values(tmp_path, monkeypatch):
    """--compile-cache: default under XDG_CACHE_HOME, `none` for no cache, a file refused in one line."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert parse_compile_cache(None) == default_compile_cache() == tmp_path / "wan_spmd" / "compile"
    assert parse_compile_cache("none") is None and parse_compile_cache("NONE") is None
    assert parse_compile_cache(str(tmp_path / "c")) == tmp_path / "c"
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="a file, not a folder"):
        parse_compile_cache(str(tmp_path / "f"))


def test_folder_holds_the_key_and_points_torch_there(tmp_path):
    """The keyed subfolder is made with key.json beside torch's entries, and inductor and Triton
    write there. If this fails, compiles land in /tmp and a restart compiles everything again."""
    key = cache_key(**BASE)
    cache = open_compile_cache(tmp_path, key)
    assert cache.folder == tmp_path / key_digest(key)
    assert json.loads((cache.folder / "key.json").read_text()) == key
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache.folder / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(cache.folder / "triton")
    assert torch.compiler.config.force_disable_caches is False
    assert open_compile_cache(tmp_path, key).folder == cache.folder  # a second rank or replica: same


def test_unusable_folder_is_a_warning(tmp_path):
    """A subfolder that cannot be made (here a file in its place) warns and runs without the cache.
    If this fails, a read-only or full volume stops the server from starting."""
    key = cache_key(**BASE)
    (tmp_path / key_digest(key)).write_text("not a folder")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("wan_spmd")
    logger.addHandler(handler)
    try:
        cache = open_compile_cache(tmp_path, key)
    finally:
        logger.removeHandler(handler)
    assert cache.folder is None and cache.describe() == "no compile cache"
    assert torch.compiler.config.force_disable_caches is True
    assert any("cannot be used" in r.getMessage() and r.levelno == logging.WARNING for r in records)
