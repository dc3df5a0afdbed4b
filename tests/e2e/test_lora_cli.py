"""`--lora`, `--lora-high`, `--lora-low` as a user passes them: a served model names what was fused
(by file name, scale and content hash, never by path), generate changes its video, and a bad LoRA
stops every rank with one line and exit 2 before anything loads or listens."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from tests.conftest import EXAMPLE_IMAGE, run_cli
from tests.e2e.test_serve import _start, _stop
from tests.lora_files import write_peft, write_wan


def _frames(folder) -> list[bytes]:
    return [Image.open(p).tobytes() for p in sorted(folder.glob("*.png"))]


def test_generate_with_a_lora_per_expert(cache_home, tiny_i2v, tmp_path):
    """generate takes one LoRA per expert (two formats) and writes a different video than without;
    the load line names each by file, scale and hash."""
    high = write_wan(tmp_path / "high.safetensors", 1, diffs=True)
    low = write_peft(tmp_path / "low.safetensors", 2)
    frames = {}
    for name, extra in (("plain", []), ("lora", ["--lora-high", f"{high}:0.9", "--lora-low", str(low)])):
        args = ["generate", "--prompt", "a kite", "--image", str(EXAMPLE_IMAGE), "--seed", "4"]
        args += ["--output", str(tmp_path / f"{name}.mp4"), "--frames-dir", str(tmp_path / name), *extra]
        proc = run_cli(args)
        assert proc.returncode == 0, proc.stderr
        frames[name] = _frames(tmp_path / name)
    assert len(frames["lora"]) == len(frames["plain"]) == 9
    assert frames["lora"] != frames["plain"]
    assert re.search(r"fused LoRA high\.safetensors x0\.9 \(high, sha256 [0-9a-f]{12}\)", proc.stderr), proc.stderr
    assert "fused LoRA low.safetensors x1 (low, sha256" in proc.stderr


def test_served_model_names_its_loras_without_paths(cache_home, tiny_i2v, tmp_path):
    """/v1/models and the ready line list what was fused: name, scale, experts, 12-hex sha256; no
    path of the server's disk leaks to clients."""
    lora = write_wan(tmp_path / "style.safetensors", 3)
    server = _start(tmp_path, "--lora", f"{lora}:0.6")
    try:
        (card,) = server.client.get("/v1/models").json()["data"]
        (entry,) = card["loras"]
        assert entry["name"] == "style.safetensors" and entry["scale"] == 0.6 and entry["experts"] == "all"
        assert re.fullmatch(r"[0-9a-f]{12}", entry["sha256"])
        assert str(tmp_path) not in str(card)
        ready = next(line for line in server.log_text().splitlines() if "ready:" in line)
        assert f"LoRA style.safetensors x0.6 (all, sha256 {entry['sha256']})" in ready
        assert str(lora) not in server.log_text()  # the LoRA's path appears nowhere
    finally:
        server.client.close()
        _stop(server.proc)


@pytest.mark.parametrize(
    "nproc, lora, message",
    [
        (0, "missing.safetensors", "error: --lora missing.safetensors: no such file"),
        (0, "{dir}/ok.safetensors:strong", "scale 'strong' is not a number"),
        (0, "{dir}/unknown.safetensors", "keys that match no module of a Wan2.2 expert"),
        (0, "{dir}/nan.safetensors", "alpha must be one finite number, got nan"),
        (2, "{dir}/big.safetensors", "blocks.0.norm2.weight: the LoRA's delta is (5120,) but the model's is (48,)"),
        (2, "missing.safetensors", "error: --lora missing.safetensors: no such file"),
    ],
)
def test_bad_lora_stops_every_rank_with_one_line(cache_home, tiny_i2v, tmp_path, nproc, lora, message):
    """A missing file, a bad scale, an unknown key, a wrong shape: one `error:` line, exit 2 (under
    torchrun: on every rank, torchrun's summary shows 2 for each), no traceback, nothing served."""
    import torch

    write_peft(tmp_path / "ok.safetensors", 0)
    write_wan(tmp_path / "nan.safetensors", 0, alpha=float("nan"))
    write_wan(tmp_path / "unknown.safetensors", 0, extra={"diffusion_model.blocks.0.self_attn.zz.diff": torch.zeros(3)})
    write_wan(tmp_path / "big.safetensors", 0, extra={"diffusion_model.blocks.0.norm3.diff": torch.zeros(5120)})
    args = ["serve", "--port", "0", "--output-dir", str(tmp_path / "out"), "--lora", lora.format(dir=tmp_path)]
    proc = run_cli(args, nproc=nproc, timeout=180)
    output = proc.stdout + proc.stderr
    assert output.count(message) == 1, output
    assert "wan_spmd/" not in output.split("ChildFailedError")[0]  # no frame of ours in any traceback
    assert "listening on" not in output
    if nproc:
        codes = re.findall(r"exitcode\s*:\s*(-?\d+)", output)
        assert proc.returncode == 1 and codes and set(codes) == {"2"}, output
    else:
        assert proc.returncode == 2
        error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1, proc.stderr
