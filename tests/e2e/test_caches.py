"""Prompt and condition caches across requests, as a user meets them: a 2-rank batch (row-split VAE,
so condition lookups are agreed) of a request, the same again, another seed and another image."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.conftest import EXAMPLE_IMAGE, run_cli
from tests.e2e.test_batch import FAST, by_line, read_results, write_jsonl
from wan_spmd.server.metrics import ServerMetrics


def test_repeated_image_and_prompt_hit_and_give_the_same_video(tiny_i2v, tmp_path: Path):
    """If this fails, a repeated request encodes its prompt or image again (no hit), a hit hands
    back something else than the miss computed (the mp4 differs), the seed became part of a key (a
    new seed misses), another image is served the cached condition (it hits), or the hit counts do
    not reach the job's timings."""
    flipped = tmp_path / "flipped.png"
    Image.open(EXAMPLE_IMAGE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    first = {"id": "first", "prompt": "a cat", "image": str(EXAMPLE_IMAGE), "seed": 1, "guidance_scale": 3.0, **FAST}
    lines = [
        first,
        {**first, "id": "again"},
        {**first, "id": "seed", "seed": 2},
        {**first, "id": "image", "image": str(flipped)},
    ]
    requests = write_jsonl(tmp_path / "requests.jsonl", lines)
    out = tmp_path / "out"
    proc = run_cli(["batch", str(requests), "--output-dir", str(out), "--prompt-cache", "4"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = by_line(read_results(out / "results.jsonl"))
    counts = {
        n: {k: r["timings_ms"].get(k) for k in ("PromptCacheHits", "PromptCacheMisses", "ConditionCacheHits")}
        for n, r in rec.items()
    }
    # CFG on: the prompt and the negative prompt are two entries
    assert counts[1] == {"PromptCacheHits": 0, "PromptCacheMisses": 2, "ConditionCacheHits": 0}
    assert counts[2] == {"PromptCacheHits": 2, "PromptCacheMisses": 0, "ConditionCacheHits": 1}
    assert counts[3] == {"PromptCacheHits": 2, "PromptCacheMisses": 0, "ConditionCacheHits": 1}
    assert counts[4] == {"PromptCacheHits": 2, "PromptCacheMisses": 0, "ConditionCacheHits": 0}
    assert rec[4]["timings_ms"]["ConditionCacheMisses"] == 1
    videos = {n: (out / rec[n]["output"]).read_bytes() for n in rec}
    assert videos[2] == videos[1]
    assert videos[3] != videos[1] and videos[4] != videos[1]


def test_everything_off_gives_the_same_video(tiny_i2v, tmp_path: Path):
    """If this fails, `--prompt-cache 0 --condition-cache 0` still caches (hits appear, or counts of
    caches that are off), or the video with the caches and the encode's reuse on (the defaults) is
    not the same bytes as with all three off (`--no-vae-encode-reuse`)."""
    job = {"id": "a", "prompt": "a cat", "image": str(EXAMPLE_IMAGE), "seed": 1, **FAST}
    requests = write_jsonl(tmp_path / "requests.jsonl", [job, {**job, "id": "b"}])
    off, on = tmp_path / "off", tmp_path / "on"
    args = ["--prompt-cache", "0", "--condition-cache", "0", "--no-vae-encode-reuse"]
    proc = run_cli(["batch", str(requests), "--output-dir", str(off), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_results(off / "results.jsonl")
    assert len(records) == 2
    for record in records:
        assert not any("Cache" in k for k in record["timings_ms"]), record["timings_ms"]
    proc = run_cli(["batch", str(write_jsonl(tmp_path / "one.jsonl", [job])), "--output-dir", str(on)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = read_results(on / "results.jsonl")
    assert record["timings_ms"]["ConditionCacheMisses"] == 1
    assert (on / record["output"]).read_bytes() == (off / records[0]["output"]).read_bytes()


def test_metrics_count_lookups_not_latencies():
    """If this fails, /metrics reads cache counts as stage latencies (a histogram of "2 ms") or
    loses them."""
    metrics = ServerMetrics(queue_depth=lambda: 0, ready=lambda: True)
    metrics.observe({"PromptCacheHits": 2.0, "ConditionCacheMisses": 1.0, "Denoising": 1500.0})
    metrics.observe({"PromptCacheHits": 1.0, "ConditionCacheHits": 1.0})
    text = metrics.render().decode()
    assert 'wan_spmd_cache_lookups_total{cache="prompt",result="hit"} 3.0' in text
    assert 'wan_spmd_cache_lookups_total{cache="condition",result="miss"} 1.0' in text
    assert 'wan_spmd_cache_lookups_total{cache="condition",result="hit"} 1.0' in text
    assert 'stage="Denoising"' in text and 'stage="PromptCacheHits"' not in text
