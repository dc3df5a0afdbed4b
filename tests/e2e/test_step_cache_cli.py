"""`--cache-backend` as a user passes it: generate with vllm-omni's flag names, a LoRA fused at
load and a request threshold writes its video and reports what the cache skipped."""

from __future__ import annotations

import re

from tests.conftest import EXAMPLE_IMAGE, run_cli
from tests.lora_files import write_wan


def test_generate_with_mag_cache_and_a_lora_reports_skipped_forwards(cache_home, tiny_i2v, tmp_path):
    """If this fails, the cache flags do not reach the engine from the command line, do not compose
    with a LoRA fused into the experts, or the request's summary (k of n forwards per expert) is lost."""
    lora = write_wan(tmp_path / "high.safetensors", 1, diffs=True)
    args = [
        "generate",
        "--prompt",
        "a kite",
        "--image",
        str(EXAMPLE_IMAGE),
        "--seed",
        "4",
        "--num-inference-steps",
        "12",
    ]
    args += ["--output", str(tmp_path / "o.mp4"), "--lora-high", f"{lora}:0.9"]
    args += ["--cache-backend", "mag_cache", "--cache-config", '{"magcache_K": 3}', "--cache-threshold", "0.5"]
    proc = run_cli([*args, "--enable-cache-dit-summary"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o.mp4").stat().st_size > 0
    skipped = {m[0]: float(m[1]) for m in re.findall(r"StepCacheSkipped/(\w+)=(\d+)", proc.stdout)}
    forwards = {m[0]: float(m[1]) for m in re.findall(r"StepCacheForwards/(\w+)=(\d+)", proc.stdout)}
    assert set(skipped) == set(forwards) == {"transformer", "transformer_2"}, proc.stdout
    assert sum(forwards.values()) == 24  # 12 steps x 2 guidance branches
    assert 0 < sum(skipped.values()) < 24
    assert "step cache: mag_cache (magcache_K=3)" in proc.stderr
    assert re.search(r"step cache mag_cache skipped transformer \d+/\d+, transformer_2 \d+/\d+", proc.stderr)
