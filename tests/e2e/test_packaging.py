"""Packaging and start-up facts that need a fresh interpreter or another process."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT, cli_env
from wan_spmd.config import TINY_VERSION, inspect_model_folder

# Modules the CLI, the HTTP layer and the fronts import before the arguments are checked: none may
# load torch (bad arguments fail in a fraction of a second, and the HTTP thread never touches a tensor).
TORCH_FREE = (
    "wan_spmd.cli",
    "wan_spmd.config",
    "wan_spmd.families",
    "wan_spmd.launch",
    "wan_spmd.options",
    "wan_spmd.params",
    "wan_spmd.images",
    "wan_spmd.jobs",
    "wan_spmd.memory",
    "wan_spmd.process",
    "wan_spmd.video",
    "wan_spmd.batch",
    "wan_spmd.batch.lines",
    "wan_spmd.batch.shards",
    "wan_spmd.batch.results",
    "wan_spmd.batch.runner",
    "wan_spmd.generate",
    "wan_spmd.serve",
    "wan_spmd.server.app",
    "wan_spmd.server.context",
    "wan_spmd.server.routes",
    "wan_spmd.server.routes.videos",
    "wan_spmd.server.routes.system",
    "wan_spmd.server.body",
    "wan_spmd.server.wire",
    "wan_spmd.server.queue",
    "wan_spmd.server.errors",
    "wan_spmd.server.metrics",
    "wan_spmd.server.http",
    "wan_spmd.server.options",
    "wan_spmd.server.videos",
)


@pytest.fixture(scope="module")
def all_torch_free() -> bool:
    """Whether importing every TORCH_FREE module in one fresh interpreter leaves torch unloaded: one
    process for the usual case; only when it does load torch does each module get its own."""
    code = f"import sys; import {', '.join(TORCH_FREE)}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    return done.returncode == 0 and done.stdout.strip() == "False"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module, all_torch_free):
    """If this fails, `module` (or something it imports) loads torch at import time: the CLI's
    one-line errors get slow, or the HTTP layer (DESIGN.md) depends on the pipeline."""
    if all_torch_free:
        return  # together they loaded no torch, so neither does any one alone
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_torch_modules_do_load_torch():
    """The check above can fail: a module that needs torch is seen loading it."""
    code = "import sys, wan_spmd.pipeline; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert done.stdout.strip() == "True", done.stderr


def test_concurrent_builds_of_the_cache_give_one_whole_folder(tmp_path):
    """Two processes asking for `tiny` at once (torchrun ranks) must both get a complete folder."""
    code = "from wan_spmd.tiny import ensure_tiny; print(ensure_tiny('t2v'))"
    env = cli_env(XDG_CACHE_HOME=str(tmp_path))
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    root = tmp_path / "wan_spmd"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".tiny-t2v.lock")) == [
        f"tiny-t2v-v{TINY_VERSION}"
    ]
    inspect_model_folder(outs[0])


def test_installed_package_ships_its_configs(tmp_path):
    """Without the source tree an installed wan_spmd must still find configs/*.toml (package data)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("wan_spmd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "wan_spmd/configs/wan2.2-i2v-a14b.toml" in names
    assert "wan_spmd/configs/wan2.2-t2v-a14b.toml" in names
    # every subpackage ships (a wheel without parallel/ imports nothing that loads a model)
    assert {"wan_spmd/parallel/tp.py", "wan_spmd/server/app.py", "wan_spmd/engine.py"} <= set(names)
