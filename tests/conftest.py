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


# Modules that share a session-scoped launch or server run on one pytest-xdist worker, which then
# makes it once (a worker has its own session); every other module is a group of its own, so its
# module-scoped fixtures are made once and its tests keep their file order.
SHARED_GROUPS = {
    "tests/dist/test_parallel_modes.py": "spmd_runs",  # tests/dist/conftest.py's launches
    "tests/dist/test_sharded_loading.py": "spmd_runs",
    "tests/dist/test_tensor_parallel.py": "spmd_runs",
    "tests/e2e/test_serve.py": "server http",  # servers.get("http", ...)
    "tests/e2e/test_hostile_http.py": "server http",
    "tests/e2e/test_readme.py": "server http",
    "tests/e2e/test_video_jobs.py": "server jobs",  # servers.get("jobs", ...)
    "tests/e2e/test_hostile_inputs.py": "server jobs",
}


# The longest groups (seconds on two cores), handed out first so that the short ones even out the
# end; the others follow in collection order.
LONGEST_FIRST = [
    "spmd_runs",
    "tests/dist/test_step_cache.py",
    "server http",
    "server jobs",
    "tests/e2e/test_resilience.py",
    "tests/e2e/test_compile_cache.py",
]


def worker_group(nodeid: str) -> str:
    """The group of a test (`tests/x.py::test_y[...]`): its module's shared group, else the module."""
    module = nodeid.split("::", 1)[0]
    return SHARED_GROUPS.get(module, module)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist, never called
def pytest_xdist_make_scheduler(config, log):
    """Whole groups (`worker_group`) to each worker, in collection order: xdist's loadscope
    scheduling with our groups as the scopes (its own `xdist_group` marks do not reach pytest 9's
    node ids)."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # the collection's order (LONGEST_FIRST), not by test count

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest groups first (LONGEST_FIRST; a stable sort: each module keeps its order). Tests
    marked `gpu` need a CUDA device; elsewhere they are skipped with that reason."""
    import torch

    def rank(item: pytest.Item) -> int:
        group = worker_group(item.nodeid)
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
