"""The mp4 writer failing under a user: a full disk (a tiny RLIMIT_FSIZE, so ffmpeg cannot write past
it) and names ffmpeg could read as a protocol (`clip:1.mp4`). A failed write is a failed job (HTTP
500 in the error shape, a failed batch line redone on resume); nothing is renamed into place."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import EXAMPLE_IMAGE, ROOT, cli_env, run_cli
from wan_spmd.video import probe_mp4

FULL_DISK_BYTES = 2048  # under a 128x128x9 mp4 of the tiny model, over a results line


def _full_disk() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_DISK_BYTES, FULL_DISK_BYTES))


def test_batch_line_fails_on_a_full_disk_and_is_redone(tiny_i2v, tmp_path: Path):
    """If this fails, a truncated or empty mp4 was recorded ok (and never redone on resume), a
    temporary file was left, or a name with a colon went to an ffmpeg protocol instead of the file."""
    line = {
        "id": "c1",
        "prompt": "kite",
        "image": str(EXAMPLE_IMAGE),
        "output": "clip:1.mp4",
        "seed": 3,
        "size": "128x128",
    }
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps(line) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wan_spmd", "batch", str(requests), "--output-dir", str(out)]
    full = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=ROOT, preexec_fn=_full_disk)
    assert full.returncode == 1, full.stderr[-3000:]
    (record,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "failed" and "ffmpeg could not write clip:1.mp4" in record["error"], record
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]  # no video, no temporary file

    again = run_cli(["batch", str(requests), "--output-dir", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 ok, 0 failed" in again.stdout
    video = out / "clip:1.mp4"
    assert video.stat().st_size > FULL_DISK_BYTES  # so the limit above did bite on the video
    assert probe_mp4(video)["num_frames"] == 9


def test_http_answers_500_on_a_full_disk_and_keeps_serving(tiny_i2v, tmp_path: Path):
    """If this fails, a video that could not be written was answered 200 (a truncated file), the
    error was not JSON in the API's shape, a file was left in --output-dir, or the server died."""
    sock, out = tmp_path / "wan.sock", tmp_path / "videos"
    cmd = [sys.executable, "-m", "wan_spmd", "serve", "--uds", str(sock), "--output-dir", str(out)]
    # a pipe, not a file, for the log: the file-size limit must hit only the video
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=cli_env(),
        cwd=ROOT,
        preexec_fn=_full_disk,
        start_new_session=True,
    )
    log: list[bytes] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    client = httpx.Client(base_url="http://serve", transport=httpx.HTTPTransport(uds=str(sock)), timeout=120)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, b"".join(log).decode(errors="replace")
            time.sleep(0.1)
        files = {"input_reference": ("in.png", EXAMPLE_IMAGE.read_bytes(), "image/png")}
        for _ in range(2):  # the second shows the loop went on
            answer = client.post(
                "/v1/videos/sync", data={"prompt": "kite", "seed": "1", "size": "128x128"}, files=files
            )
            assert answer.status_code == 500, answer.text
            error = answer.json()["error"]
            assert "ffmpeg could not write" in error["message"] and error["type"], error
        assert client.get("/health").status_code == 200
        # no video and no temporary file (the job store keeps its failed records under jobs/)
        assert not [p for p in out.rglob("*") if p.suffix in (".mp4", ".part") or p.name.endswith(".mp4.part")]
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
