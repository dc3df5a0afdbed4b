"""Shared fixtures: the tiny checkpoints (built once per session through the real loader's layout)
and helpers that run wan_spmd as a user does, alone or under a real torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = ROOT / "examples" / "example.png"


@pytest.fixture
def keep_compile_cache_settings(monkeypatch):
    """What `compile_cache` sets for torch (the cache folders' environment, torch's switch that
    disables its caches) is put back after the test, so one test's cache set-up never reaches another."""
    import torch

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
        monkeypatch.delenv(name)
    disabled = torch.compiler.config.force_disable_caches
    yield
    torch.compiler.config.force_disable_caches = disabled


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory) -> Path:
    """A private XDG_CACHE_HOME so `--model tiny` builds its cache fresh for this test session."""
    home = tmp_path_factory.mktemp("xdg-cache")
    os.environ["XDG_CACHE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_i2v(cache_home) -> Path:
    from wan_spmd.tiny import ensure_tiny

    return ensure_tiny("i2v")


@pytest.fixture(scope="session")
def tiny_t2v(cache_home) -> Path:
    from wan_spmd.tiny import ensure_tiny

    return ensure_tiny("t2v")


@pytest.fixture(scope="session")
def tiny_ti2v(cache_home) -> Path:
    from wan_spmd.tiny import ensure_tiny

    return ensure_tiny("ti2v")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks on two cores: no oversubscription
    env.update(extra)
    return env


def run_cli(args: list[str], *, nproc: int = 0, timeout: float = 300, cwd: Path | None = None, **env: str):
    """`python -m wan_spmd ARGS`, or the same under `torchrun --standalone --nproc-per-node N`."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += ["-m", "wan_spmd", *args]
    else:
        cmd = [sys.executable, "-m", "wan_spmd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(**env), cwd=cwd or ROOT)


def run_torchrun_script(script: Path, args: list[str], nproc: int = 2, timeout: float = 300, **env: str):
    """A test's own SPMD program under a real torchrun (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(
        [*cmd, str(script), *args], capture_output=True, text=True, timeout=timeout, env=cli_env(**env), cwd=ROOT
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device; elsewhere they are skipped with that reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
