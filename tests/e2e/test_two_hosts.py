"""One replica over two hosts (issue 21), as two torchrun agents on this machine: `--nnodes 2
--nproc-per-node 1` with c10d rendezvous on 127.0.0.1, one rank each. Only the cfg dimension may
cross hosts: `--cfg-parallel` runs, a tp group spanning the agents is refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import EXAMPLE_IMAGE, ROOT, cli_env, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_agents(args: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents ("hosts") of one job, one rank each, running `python -m wan_spmd ARGS`."""
    port = free_port()
    launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    launcher += ["--rdzv-id=two-hosts", "--max-restarts=0"]
    procs = []
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "wan_spmd", *args]
        procs.append(
            subprocess.Popen(
                cmd,
                env=cli_env(),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs, strict=True)]


def frames(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_cfg_groups_on_two_hosts_give_the_frames_of_one_process(tiny_i2v, tmp_path: Path):
    """If this fails, the guidance branches split over two hosts compute another video than one
    process does (the one exchange per step crosses the network, here loopback)."""
    base = ["generate", "--prompt", "a kite", "--image", str(EXAMPLE_IMAGE), "--seed", "4", "--num-frames", "5"]
    alone = run_cli([*base, "--output", str(tmp_path / "one.mp4"), "--frames-dir", str(tmp_path / "one")])
    assert alone.returncode == 0, alone.stderr[-3000:]
    done = two_agents(
        [*base, "--cfg-parallel", "--output", str(tmp_path / "two.mp4"), "--frames-dir", str(tmp_path / "two")]
    )
    assert [p.returncode for p in done] == [0, 0], "\n".join(p.stderr[-2000:] for p in done)
    one, two = frames(tmp_path / "one"), frames(tmp_path / "two")
    assert one.shape == two.shape and len(one) == 5 and one.std() > 2
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1  # 8-bit rounding at most
    assert (tmp_path / "two.mp4").is_file()


def test_tp_group_spanning_two_hosts_is_refused(tiny_i2v, tmp_path: Path):
    """Without --cfg-parallel the two ranks form one tp group across the agents: every rank stops
    before loading with one line naming the numbers, exit 2 (torchrun's agent then exits 1)."""
    args = ["generate", "--prompt", "x", "--image", str(EXAMPLE_IMAGE), "--output", str(tmp_path / "never.mp4")]
    done = two_agents(args, timeout=120)
    assert all(p.returncode != 0 for p in done)
    message = "tp=2 x ulysses=1 = 2 ranks per group would span hosts of 1 rank(s) each"
    said = [p for p in done if message in p.stderr]
    assert len(said) == 1, "\n".join(p.stderr[-2000:] for p in done)  # printed once, by rank 0
    assert "wan_spmd/" not in said[0].stderr.split("ChildFailedError")[0]  # no traceback of ours
    assert not (tmp_path / "never.mp4").exists()
