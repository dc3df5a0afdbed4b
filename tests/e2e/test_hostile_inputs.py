"""Hostile values and images through every front (issue 20), as a user drives them: a batch file
mixing every bad line with good ones under a real 2-rank torchrun, the CLI's one-line errors, and a
real HTTP server (torchrun, 2 ranks) fuzzed with mutated images and bodies. One test per defect."""

from __future__ import annotations

import base64
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLE_IMAGE, run_cli
from tests.e2e.test_batch import FAST, by_line, read_results
from tests.e2e.test_serve import Server
from tests.images_util import bomb_png, encode, gradient
from wan_spmd.server.errors import KINDS

BAD_LINES = {
    # the issue's lines that stopped the batch with a traceback before any job ran
    "NUL in image path": ({"image": "img/\u0000cat.png"}, "NUL"),
    "unknown home in image path": ({"image": "~nosuchuser-20/cat.png"}, "home folder"),
    "lone surrogate in prompt": ('"prompt": "a \\ud800 cat"', "not valid Unicode"),
    "lone surrogate in id": ('"id": "\\udc80x"', None),  # valid: the id is recorded escaped
    "size with a superscript": ({"size": "²x32"}, "WIDTHxHEIGHT"),
    "seconds 1e308": ({"seconds": 1e308, "num_frames": None}, "seconds must be at most 3600"),
    "401-digit guidance": ('"guidance_scale": ' + "9" * 401, "finite"),
    "5000-digit integer": ('"seed": ' + "9" * 5000, "4300 digits"),
    "nested 100k deep": ('"extra": ' + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "image is /dev/zero": ({"image": "/dev/zero"}, "not a regular file"),
    "image is a FIFO": ({"image": "img/fifo"}, "not a regular file"),
    "image is a bomb": ({"image": "img/bomb.png"}, "over the 25000000-pixel limit"),
    "image is a TIFF": ({"image": "img/cat.tiff"}, "only PNG, JPEG and WebP"),
    "10 MiB prompt": ({"prompt": "p" * (10 * 2**20)}, "over the limit 10000"),
    # the tiny model's largest video (512 px, 125 frames: its rotary table) at 200 steps, 6.6M token-steps
    "hours of work": ({"size": "512x512", "num_frames": 125, "num_inference_steps": 200}, "--max-work"),
}


def _line(good: dict, change: dict | str) -> str:
    if isinstance(change, str):  # raw JSON text, for what json.dumps cannot write
        return json.dumps(good)[:-1] + ", " + change + "}"
    merged = {k: v for k, v in {**good, **change}.items() if v is not None}
    return json.dumps(merged)


def test_batch_records_every_bad_line_and_runs_the_good_ones(tiny_i2v, tmp_path: Path):
    """Every line the issue found fatal, between good lines, under 2 ranks: each bad line is recorded
    failed with its reason, every good line is done, the batch exits 1 and nothing hangs (a FIFO and
    /dev/zero are refused unread). If this fails, one bad line stops (or hangs) the batch before any
    job runs, while the README promises bad lines are recorded and the batch goes on."""
    img = tmp_path / "img"
    img.mkdir()
    (img / "cat.png").write_bytes(EXAMPLE_IMAGE.read_bytes())
    (img / "bomb.png").write_bytes(bomb_png())
    (img / "cat.tiff").write_bytes(encode(gradient(32, 32), "TIFF"))
    os.mkfifo(img / "fifo")
    good = {"prompt": "a cat", "image": "img/cat.png", "seed": 1, **FAST}
    lines, expected = [], {}
    for i, (name, (change, message)) in enumerate(BAD_LINES.items()):
        lines.append(json.dumps({**good, "seed": 100 + i}))  # a good line between bad ones
        lines.append(_line({**good, "id": f"bad-{i}"} if "id" not in str(change) else good, change))
        expected[len(lines)] = (name, message)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    start = time.monotonic()
    proc = run_cli(["batch", str(requests), "--output-dir", str(out)], nproc=2, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # the only traceback is torchrun's own ChildFailedError for the exit status 1 (README)
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr, proc.stderr[-3000:]
    records = by_line(read_results(out / "results.jsonl"))
    assert sorted(records) == list(range(1, len(lines) + 1))
    for n, (name, message) in expected.items():
        rec = records[n]
        if message is None:
            assert rec["status"] == "ok" and rec["id"] == "\udc80x", (name, rec)
        else:
            assert rec["status"] == "failed" and message in rec["error"], (name, rec)
            assert len(rec["error"]) < 400, name  # reasons are one short line, never the value itself
    goods = [r for n, r in records.items() if n not in expected]
    assert len(goods) == len(BAD_LINES) and all(r["status"] == "ok" for r in goods)
    failed = sum(m is not None for _, m in expected.values())
    assert f"batch: {len(goods) + 1} ok, {failed} failed" in proc.stdout
    assert time.monotonic() - start < 500


CLI_BAD = {
    "superscript size": (["--size", "²x720"], "WIDTHxHEIGHT"),
    "seconds 1e308": (["--seconds", "1e308"], "seconds must be at most 3600"),
    "5000-digit steps": (["--num-inference-steps", "9" * 5000], "ASCII digits"),
    "unknown home image": (["--image", "~nosuchuser-20/x.png"], "home folder"),
    "image is /dev/zero": (["--image", "/dev/zero"], "not a regular file"),
    "huge prompt": (["--max-prompt-chars", "100"], "over the limit 100"),
    "too much work": (["--max-work", "10"], "--max-work"),
    "bomb": (["--image", "BOMB"], "over the 25000000-pixel limit"),
}


@pytest.mark.parametrize("case", sorted(CLI_BAD))
def test_cli_hostile_values_exit_2_with_one_line(case, cache_home, tiny_i2v, tmp_path: Path):
    """Each value that printed a traceback and exited 1 on main (or hung, on /dev/zero): exit 2 and
    one `error:` line naming the problem, within 60 s."""
    extra, message = CLI_BAD[case]
    if "BOMB" in extra:
        (tmp_path / "bomb.png").write_bytes(bomb_png())
        extra = [str(tmp_path / "bomb.png") if a == "BOMB" else a for a in extra]
    args = ["generate", "--prompt", "x" * 200, "--image", str(EXAMPLE_IMAGE), "--output", str(tmp_path / "o.mp4")]
    proc = run_cli([*args, *extra], timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "abc"}, "RANK='abc' must be a whole number >= 0"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' must be a whole number >= 0"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be a whole number >= 1"),
        ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 must be below WORLD_SIZE=2"),
    ],
    ids=["RANK=abc", "LOCAL_RANK=x", "WORLD_SIZE=0", "RANK past WORLD_SIZE"],
)
def test_bad_torchrun_variables_exit_2_with_one_line(env, message, tmp_path: Path):
    """torchrun's variables set by hand to something that is not a rank: exit 2 and one `error:`
    line naming the variable. If this fails, a typo in a launcher script ends in a traceback."""
    proc = run_cli(["generate", "--prompt", "x", "--output", str(tmp_path / "o.mp4")], timeout=60, **env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_cli_job_past_its_deadline_fails(cache_home, tiny_i2v, tmp_path: Path):
    """--job-deadline is enforced: a job given 1 ms (x its share of --max-work) is stopped at its
    first denoising step on every rank and fails with the deadline named, exit 1, no video. If this
    fails, a job can hold every GPU for as long as it likes."""
    out = tmp_path / "o.mp4"
    args = ["generate", "--prompt", "x", "--image", str(EXAMPLE_IMAGE), "--output", str(out), "--job-deadline", "0.001"]
    proc = run_cli([*args, "--size", "32x32", "--num-frames", "5", "--num-inference-steps", "2"], nproc=2, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ran past its deadline" in proc.stderr and not out.exists(), proc.stderr[-3000:]


# -- HTTP ------------------------------------------------------------------------------------------

UPLOAD = 1024 * 1024  # --max-upload-bytes of this module's server: room for the 657 KB bomb


@pytest.fixture(scope="module")
def server(servers, tiny_i2v) -> Server:
    """The session's keyed TCP server (test_video_jobs' `server`; its client sends the key)."""
    from tests.e2e.test_video_jobs import start_jobs

    return servers.get("jobs", start_jobs)


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _rank0_pid(server: Server) -> int:
    return server.ranks()[0]


def _error(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text[:200]
    return r.json()["error"]


def test_http_bomb_is_400_fast_and_health_stays_quick(server):
    """The issue's 657 KB PNG of 13000x13000 RGBA: 400 naming input_reference, refused from its
    header: rank 0's peak memory grows under 100 MB (decoding it takes 1.3 GiB and 3.6 s, and stalled
    /health 4-13 s), and /health answers right after. Then a TIFF is refused for its format."""
    pid = _rank0_pid(server)
    peak_before = _vm_hwm_kib(pid)
    data = bomb_png()
    files = {"input_reference": ("bomb.png", data, "image/png")}
    with httpx.Client(base_url=str(server.client.base_url), timeout=30) as other:
        r = server.client.post("/v1/videos", data={"prompt": "x"}, files=files)
        assert other.get("/health").status_code == 200
    assert r.status_code == 400, r.text
    error = _error(r)
    assert error["param"] == "input_reference" and "169000000 pixels" in error["message"]
    assert _vm_hwm_kib(pid) - peak_before < 100 * 1024  # never decoded
    tiff = {"input_reference": ("x.tiff", encode(gradient(), "TIFF"), "image/tiff")}
    r = server.client.post("/v1/videos", data={"prompt": "x"}, files=tiff)
    assert r.status_code == 400 and "only PNG, JPEG and WebP" in _error(r)["message"]


HTTP_BAD = [
    ({"size": "²x720"}, "size"),
    ({"seconds": 1e308}, "seconds"),
    ({"guidance_scale": 10**400}, "guidance_scale"),
    ({"prompt": "p" * (200 * 1024)}, "prompt"),
    ({"size": "512x512", "num_frames": 125, "num_inference_steps": 200}, "num_inference_steps"),
    ({"prompt": "a \ud800 cat"}, "prompt"),
]


def test_http_hostile_values_are_400(server):
    """Each value that answered a text/plain 500 on main is a JSON 400 naming its field; a lone
    surrogate in an unknown key is only a warning (escaped), not a 500 after the video was made."""
    image = base64.b64encode(EXAMPLE_IMAGE.read_bytes()).decode()
    for change, field in HTTP_BAD:
        body = json.dumps({"prompt": "x", "input_reference": image, **change}).encode()
        r = server.client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and _error(r)["param"] == field, (change, r.text[:300])
    body = json.dumps(
        {"prompt": "x", "\ud800key": 1, "size": "32x32", "num_frames": 5, "num_inference_steps": 1,
         "input_reference": image}
    ).encode()  # fmt: skip
    r = server.client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["warnings"][0] == "ignored unknown keys: \\ud800key", r.text[:300]


def _mutations(rng: random.Random, data: bytes, count: int) -> Iterator[bytes]:
    for _ in range(count):
        mutated = bytearray(data)
        kind = rng.random()
        if kind < 0.3:
            mutated = mutated[: rng.randrange(len(mutated))]
        else:
            for _ in range(rng.randint(1, 6)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        yield bytes(mutated)


def test_fuzzed_images_and_bodies_never_500(server):
    """120 mutated images (PNG, JPEG, WebP) and 120 mutated JSON bodies, capped at 120 s in all: no
    answer is a 5xx or not JSON, no request hangs (each within 30 s), and the server is healthy and
    makes a video after. If this fails, some corrupt input still reaches an unexpected exception."""
    rng = random.Random(20)
    images = [encode(gradient(), fmt) for fmt in ("PNG", "JPEG", "WEBP")]
    base = {"prompt": "x", "size": "32x32", "num_frames": 4, "num_inference_steps": 1}  # 4: never runs a job
    statuses: dict[int, int] = {}
    start = time.monotonic()
    cases = [(img, None) for src in images for img in _mutations(rng, src, 40)]
    good_body = json.dumps({**base, "seed": 7, "guidance_scale": 2.5, "extra": [1, {"a": "b"}]}).encode()
    cases += [(None, body) for body in _mutations(rng, good_body, 120)]
    rng.shuffle(cases)
    for image, body in cases:
        if time.monotonic() - start > 120:
            break
        if image is not None:
            r = server.client.post(
                "/v1/videos", data={k: str(v) for k, v in base.items()}, files={"input_reference": ("i", image)}
            )
        else:
            r = server.client.post("/v1/videos", content=body, headers={"content-type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert _error(r)["code"] == KINDS[r.status_code][1]
    assert sum(statuses.values()) >= 200, statuses
    assert server.client.get("/health").status_code == 200
    ok = server.client.post(
        "/v1/videos/sync",
        data={**{k: str(v) for k, v in base.items()}, "num_frames": "5"},
        files={"input_reference": ("cat.png", EXAMPLE_IMAGE.read_bytes(), "image/png")},
    )
    assert ok.status_code == 200 and ok.headers["content-type"] == "video/mp4"
