"""README.md's code blocks as a newcomer runs them (issue 34): every fenced block is classified
below, by its first line; the ones that need no GPU run as written (the quick start through
launch.sh, the curl lines and the OpenAI SDK snippet against a real tiny server), and the ones
that cannot run here say why and have their flags checked against the CLI. A new block fails the first test until it is
classified, so no example goes unchecked."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import EXAMPLE_IMAGE, ROOT, cli_env
from tests.e2e.test_deploy import check_wan_flags, pins, pip_installs, pyproject
from wan_spmd.video import probe_mp4

README = ROOT / "README.md"

# First line of a block -> "run" (a test below runs it) or why it is not run here.
BLOCKS = {
    "./launch.sh generate": "run",
    "./launch.sh test": "skip: the test suite itself (this test is part of it)",
    "# CPU only": "skip: downloads torch from PyTorch's index (no network in tests); its pins are checked",
    "# NVIDIA GPUs": "skip: a CUDA wheel for a GPU machine (no network, no GPU here); its pins are checked",
    'wan_spmd generate --prompt "..."': "skip: a synopsis with placeholders; its flags are checked",
    "torchrun --nproc-per-node 2 -m wan_spmd serve --model DIR --config": "skip: needs the A14B weights and LoRA "
    "files (a GPU); its flags are checked",
    "pip install huggingface_hub": "skip: downloads a model from the Hugging Face Hub (no network in tests); "
    "its flags are checked",
    "torchrun --nproc-per-node 8": "skip: 8 ranks on a model folder (a GPU host); its flags are checked",
    "from openai import OpenAI": "run",
    "curl -s http://localhost:8000/v1/models": "run",
}


def blocks() -> list[tuple[int, str, str]]:
    """(line, language, text) of every fenced block of README.md."""
    text = README.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(1), m.group(2))
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
    ]


def block(first: str) -> str:
    (found,) = [text for _, _, text in blocks() if text.startswith(first)]
    return found


def test_every_block_is_classified():
    """Each block of README.md is run by a test here, or skipped with its reason. If this fails, a
    block was added or changed: classify it in BLOCKS."""
    unclassified = [(line, text.splitlines()[0]) for line, _, text in blocks() if not _kind(text)]
    assert not unclassified, f"classify these README blocks in BLOCKS: {unclassified}"
    for first, kind in BLOCKS.items():
        assert kind == "run" or kind.startswith("skip: "), first
        assert any(text.startswith(first) for _, _, text in blocks()), f"no README block starts with {first!r}"


def _kind(text: str) -> str | None:
    matches = [kind for first, kind in BLOCKS.items() if text.startswith(first)]
    return matches[0] if len(matches) == 1 else None


def test_skipped_blocks_name_only_flags_the_cli_has():
    """Every `wan_spmd COMMAND` and `-m wan_spmd COMMAND` line of the blocks not run here (continued
    lines joined, bracketed options too) passes only options that command has. If this fails, the
    README tells users to type a flag that exits 2."""
    checked = 0
    for _, _, text in blocks():
        if not (_kind(text) or "").startswith("skip") or "wan_spmd" not in text:
            continue
        for line in re.sub(r"\\\n", " ", text).splitlines():
            found = re.search(r"(?:^|-m )wan_spmd (\w[\w-]*)(.*)", line.split("#", 1)[0])
            if not found or found.group(1).startswith("/"):
                continue
            words = re.findall(r"--[a-z][a-z0-9-]*", found.group(2))
            check_wan_flags([found.group(1), *words])
            checked += 1
    assert checked >= 5, checked


def test_install_blocks_pin_what_pyproject_and_launch_sh_pin():
    """The README's pip commands install the same torch pins as pyproject's `gpu` extra (GPU) and
    launch.sh (CPU), from the same indexes, and extras pyproject defines (or `hopper`, which the
    Dockerfile test allows while it lands). If this fails, README and launch.sh install different
    torches."""
    extras = pyproject()["project"]["optional-dependencies"]
    launch = {tuple(a) for a in pip_installs((ROOT / "launch.sh").read_text()) if "torch" in pins(a)}
    for first, extras_wanted in (("# CPU only", {"test"}), ("# NVIDIA GPUs", {"gpu", "hopper"})):
        installs = pip_installs(block(first))
        (torch,) = [a for a in installs if "torch" in pins(a)]
        same = [a for a in launch if pins(list(a)) == pins(torch) and set(torch) <= set(a) | {"-q"}]
        assert same, f"{torch} is not how launch.sh installs torch: {launch}"
        (project,) = [a for a in installs if "-e" in a]
        named = set(re.fullmatch(r"\.\[(.*)\]", project[-1]).group(1).split(","))
        assert named == extras_wanted and named <= set(extras) | {"hopper"}
    assert pins(extras["gpu"]) == pins(next(a for a in pip_installs(block("# NVIDIA GPUs")) if "torch" in pins(a)))


def test_quick_start_generate_runs_as_written(tiny_i2v, tmp_path):
    """The quick start's first line, typed in a fresh clone whose venv launch.sh already made (the
    install itself needs the network): it writes out.mp4. `./launch.sh test` is not run: it is this
    suite. If this fails, the README's first command does not work."""
    line = block("./launch.sh generate").splitlines()[0]
    clone = tmp_path / "clone"
    (clone / "examples").mkdir(parents=True)
    (clone / "launch.sh").write_bytes((ROOT / "launch.sh").read_bytes())
    (clone / "launch.sh").chmod(0o755)
    (clone / "examples" / "example.png").write_bytes(EXAMPLE_IMAGE.read_bytes())
    venv = tmp_path / "venv"  # what launch.sh leaves after its first run, pointing at this interpreter
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "wan_spmd").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m wan_spmd "$@"\n')
    (venv / "bin" / "wan_spmd").chmod(0o755)
    (clone / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    # launch.sh's stamp of the pyproject.toml it installed (cksum's line): no reinstall is due
    with (clone / "pyproject.toml").open("rb") as pyproject:
        stamp = subprocess.run(["cksum"], stdin=pyproject, capture_output=True, check=True).stdout
    (venv / ".installed").write_bytes(stamp)
    proc = subprocess.run(
        ["bash", "-c", line],
        cwd=clone,
        env=cli_env(WAN_SPMD_VENV=str(venv)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = clone / shlex.split(line)[shlex.split(line).index("--output") + 1]
    assert probe_mp4(out)["num_frames"] >= 1


@pytest.fixture(scope="module")
def tiny_server(servers, tiny_i2v):
    """The session's keyless TCP server (test_hostile_http's `server`): the snippets need no setting."""
    from tests.e2e.test_hostile_http import start_http

    return servers.get("http", start_http)


def test_sdk_snippet_runs_as_written(tiny_server, tmp_path):
    """The OpenAI SDK snippet, run as written against `serve` on the tiny model (only the address
    is the test server's, and in.png is the example image): it writes out.mp4. If this fails, the
    README's SDK example fails on the model the quick start gives."""
    code = block("from openai import OpenAI")
    base = str(tiny_server.client.base_url).rstrip("/")
    assert "http://localhost:8000/v1" in code
    (tmp_path / "in.png").write_bytes(EXAMPLE_IMAGE.read_bytes())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", code.replace("http://localhost:8000/v1", f"{base}/v1")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = probe_mp4(tmp_path / "out.mp4")
    assert meta["num_frames"] >= 1 and max(meta["width"], meta["height"]) <= 512


def test_curl_block_runs_as_written(tiny_server, tmp_path):
    """The README's curl lines, run as written by bash in a folder holding examples/example.png
    (only the address is the test server's): the models listing names the tiny model and the
    synchronous POST writes a playable out.mp4. If this fails, the README's curl example fails on
    the model the quick start gives."""
    code = block("curl -s http://localhost:8000/v1/models")
    base = str(tiny_server.client.base_url).rstrip("/")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "example.png").write_bytes(EXAMPLE_IMAGE.read_bytes())
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code.replace("http://localhost:8000", base)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"tiny"' in proc.stdout, proc.stdout[:500]
    meta = probe_mp4(tmp_path / "out.mp4")
    assert meta["num_frames"] >= 1 and max(meta["width"], meta["height"]) <= 512


def test_examples_run_on_the_tiny_model_with_no_settings(tiny_server, tmp_path):
    """examples/openai_client.py with nothing but the address: it asks GET /v1/models, sends no size
    (the model's default) and gets an mp4; with a SIZE past the model's limits it says so in one
    line when the server gives them. If this fails, the examples assume a size the quick start's
    model cannot make."""
    base = str(tiny_server.client.base_url).rstrip("/")
    env = {**os.environ, "BASE_URL": f"{base}/v1", "PYTHONWARNINGS": "ignore"}
    env.pop("SIZE", None)
    out = tmp_path / "sdk.mp4"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "openai_client.py"), str(EXAMPLE_IMAGE), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("model tiny: ")
    assert max(probe_mp4(out)["width"], probe_mp4(out)["height"]) <= 512
    card = tiny_server.client.get("/v1/models").json()["data"][0]
    if card.get("max_width"):
        big = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "openai_client.py"), str(EXAMPLE_IMAGE), str(out)],
            capture_output=True,
            text=True,
            env={**env, "SIZE": f"{card['max_width'] + 16}x{card['max_height']}"},
            timeout=120,
        )
        assert big.returncode == 2 and "takes at most" in big.stderr, big.stderr
