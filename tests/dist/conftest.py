"""One launch of tests/dist/spmd_check.py per world size, shared by every dist test that reads it.

Each world size (1: plain python, 2 and 4: torchrun) runs all its modes in one process, started
the first time a test asks for that world and kept for the session; the tests then read each
mode's files. A torchrun launch costs seconds of interpreter and torch start-up per rank on two
cores, so a launch per check made these tests most of the suite's time."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, run_torchrun_script

SCRIPT = Path(__file__).with_name("spmd_check.py")
# Per world size, the modes in the order they run. Compiling comes first, so that each compile
# mode's graph counts start in a process that has compiled nothing yet.
WORLD_MODES = {
    1: ["compile", "tp", "tp_ti2v", "dummy", "lora", "layouts:tp1"],
    2: [
        "compile:tp2,u2,cfg",
        "compile_ti2v",
        "tp",
        "tp_ti2v",
        "attn",
        "dummy",
        "lora",
        "fault",
        "slow_decode",
        "layouts:tp2,u2,cfg",
    ],
    4: ["layouts:cfg-tp2,tp2-u2"],
}
TIMEOUT_S = {1: 300, 2: 900, 4: 900}


@dataclass
class SpmdRuns:
    """The shared runs: `runs("tp", 1, 2)` is the folder of mode tp once it finished at world sizes 1
    and 2 (each launched on first use), or the test fails with what went wrong."""

    out: Path
    done: dict[int, subprocess.CompletedProcess] = field(default_factory=dict)

    def launch(self, world: int) -> subprocess.CompletedProcess:
        if world not in self.done:
            args = ["many", str(self.out), *WORLD_MODES[world]]
            if world == 1:
                cmd = [sys.executable, str(SCRIPT), *args]
                self.done[world] = subprocess.run(
                    cmd, capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=TIMEOUT_S[world]
                )
            else:
                self.done[world] = run_torchrun_script(SCRIPT, args, nproc=world, timeout=TIMEOUT_S[world])
        return self.done[world]

    def __call__(self, mode: str, *worlds: int) -> Path:
        folder = self.out / mode
        for world in worlds:
            assert any(m.split(":")[0] == mode for m in WORLD_MODES[world]), f"{mode} does not run at world {world}"
            proc = self.launch(world)
            missing = [r for r in range(world) if not (folder / f"ok-{world}-{r}").exists()]
            if missing:
                errors = "\n".join(p.read_text() for p in sorted(folder.glob(f"error-{world}-*.txt")))
                others = "\n".join(
                    p.read_text() for p in sorted(self.out.glob(f"*/error-{world}-*.txt")) if p.parent != folder
                )
                pytest.fail(
                    f"{mode} did not finish at world size {world} on rank(s) {missing} (exit {proc.returncode})\n"
                    + (errors or (f"an earlier mode failed:\n{others}" if others else proc.stderr[-4000:]))
                )
        return folder


@pytest.fixture(scope="session")
def spmd_runs(cache_home, tiny_i2v, tiny_t2v, tiny_ti2v, tmp_path_factory) -> SpmdRuns:
    from tests.lora_files import write_peft, write_wan

    out = tmp_path_factory.mktemp("spmd")
    # the lora mode's files: one on the high-noise expert (Wan format), one on both (PEFT)
    (out / "lora").mkdir()
    write_wan(out / "lora" / "high.safetensors", 11, diffs=True)
    write_peft(out / "lora" / "all.safetensors", 12)
    return SpmdRuns(out)
