"""`wan_spmd serve` as a user drives it: real `torchrun --nproc-per-node 2` (gloo, tiny model), a real
HTTP client over the real socket (TCP and a Unix socket). Two servers, each shared for the session
with test_hostile_http and reused by many requests, so the module stays fast."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLE_IMAGE, ROOT, cli_env
from wan_spmd.video import probe_mp4

START_TIMEOUT_S = 120
UPLOAD_LIMIT = 64 * 1024  # --max-upload-bytes for these servers, so a 413 costs little to provoke
API_KEY = "test-key-123"


@dataclass
class Server:
    """A running `torchrun ... serve` and a client bound to its socket."""

    proc: subprocess.Popen
    client: httpx.Client
    log: Path
    output_dir: Path
    uds: Path | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def ranks(self) -> dict[int, int]:
        return rank_pids(self.proc.pid)


def rank_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's live workers. torchrun starts each in a session of its own, so a
    signal to torchrun's process group does not reach them: tests track them by pid."""
    pids: dict[int, int] = {}
    for children in Path(f"/proc/{torchrun_pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(b"RANK="):
                    pids[int(item[5:])] = int(pid)
    return pids


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start(
    tmp: Path,
    *args: str,
    uds: Path | None = None,
    headers: dict | None = None,
    torchrun: tuple[str, ...] = (),
    out: Path | None = None,
) -> Server:
    log, out = tmp / "serve.log", out or tmp / "videos"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *torchrun]
    cmd += ["-m", "wan_spmd", "serve", "--model", "tiny", "--output-dir", str(out)]
    cmd += ["--max-upload-bytes", str(UPLOAD_LIMIT), "--max-queue", "4", *args]
    cmd += ["--uds", str(uds)] if uds else ["--port", "0"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, env=cli_env(), cwd=ROOT, start_new_session=True
        )  # its own process group: the teardown kills only it (and its workers, by pid)
    deadline = time.monotonic() + START_TIMEOUT_S
    base_url = "http://serve" if uds else None
    while base_url is None:
        found = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        if found:
            base_url = found.group(1)
        elif proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError(f"server did not start:\n{log.read_text(errors='replace')}")
        else:
            time.sleep(0.1)
    transport = httpx.HTTPTransport(uds=str(uds)) if uds else None
    client = httpx.Client(base_url=base_url, transport=transport, timeout=120, headers=headers)
    server = Server(proc, client, log, out, uds)
    wait_healthy(server, deadline)
    return server


def wait_healthy(server: Server, deadline: float) -> None:
    """Until /health says 200 (both ranks loaded); the server is stopped if it never does."""
    while True:
        try:
            if server.client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.proc.poll() is not None or time.monotonic() > deadline:
            _stop(server.proc)
            raise AssertionError(f"server never became healthy:\n{server.log_text()}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, sig: signal.Signals = signal.SIGTERM) -> int | None:
    """Signal the server's process group (torchrun), SIGKILL it if it lingers, then SIGKILL any of
    its workers still alive (they live in sessions of their own)."""
    workers = list(rank_pids(proc.pid).values()) if proc.poll() is None else []
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in workers:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    return proc.returncode


@pytest.fixture(scope="module")
def tcp_server(servers, tiny_i2v) -> Server:
    """The session's TCP server (test_hostile_http's `server`): no key."""
    from tests.e2e.test_hostile_http import start_http

    return servers.get("http", start_http)


@pytest.fixture(scope="module")
def uds_server(servers, tiny_i2v) -> Iterator[Server]:
    """The session's keyed Unix-socket server (test_hostile_http's `keyed`, key API_KEY from a file),
    with a client of its own that sends no key."""
    from tests.e2e.test_hostile_http import start_keyed

    shared = servers.get("keyed", start_keyed)
    transport = httpx.HTTPTransport(uds=str(shared.uds))
    server = dataclasses.replace(shared, client=httpx.Client(base_url="http://serve", transport=transport, timeout=120))
    yield server
    server.client.close()


def _form(**overrides: str) -> dict[str, str]:
    fields = {"prompt": "a cat on a boat", "size": "64x48", "num_frames": "5", "num_inference_steps": "2", "seed": "7"}
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not None}


def _png() -> bytes:
    return EXAMPLE_IMAGE.read_bytes()


def _check_mp4(data: bytes, tmp: Path, frames: int, size: str, fps: int) -> None:
    path = tmp / "answer.mp4"
    path.write_bytes(data)
    meta = probe_mp4(path)
    assert (meta["num_frames"], f"{meta['width']}x{meta['height']}", round(meta["fps"])) == (frames, size, fps)


def _metric(client: httpx.Client, name: str, headers: dict | None = None, **labels: str) -> float:
    text = client.get("/metrics", headers=headers).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- the happy paths ---------------------------------------------------------------------------


def test_health_models_and_openapi(tcp_server):
    """/health is the load balancer's readiness probe and /v1/models what OpenAI clients list: if
    this fails, a ready 2-rank server looks dead or unnamed, the API schema is gone, or /docs offers
    a page that is blank offline."""
    c = tcp_server.client
    assert c.get("/health").json() == {"status": "ok", "ranks": 2}
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/videos", "/v1/videos/sync", "/health", "/v1/models", "/metrics"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/videos"]["post"]["requestBody"]["content"]
    assert c.get("/docs").status_code == 404  # FastAPI's page would load its scripts from a CDN


def test_multipart_video(tcp_server, tmp_path):
    """A multipart upload as vllm-omni takes it comes back as a playable mp4 with the asked-for
    frames (seconds x fps rounded to 4k+1), size and fps, kept under --output-dir, with timings."""
    before = set(tcp_server.output_dir.glob("*.mp4")) if tcp_server.output_dir.exists() else set()
    r = tcp_server.client.post(
        "/v1/videos",
        data=_form(num_frames=None, seconds="1", fps="8"),
        files={"input_reference": ("cat.png", _png(), "image/png")},
        headers={"Accept": "application/json"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("video_") and body["model"] == "tiny"
    assert (body["num_frames"], body["size"], body["fps"], body["seed"]) == (9, "64x48", 8, 7)
    _check_mp4(base64.b64decode(body["data"][0]["b64_json"]), tmp_path, 9, "64x48", 8)
    timings = body["timings"]
    for stage in (
        "TextEncoding",
        "LatentPreparation",
        "Denoising",
        "Decoding",
        "PipelineWall",
        "Receive",
        "Validation",
        "Queue",
        "Dispatch",
        "Mp4Encoding",
        "Base64",
        "ServerTotal",
        "Overhead",
    ):
        assert timings[stage] >= 0, stage
    assert timings["Overhead"] == pytest.approx(timings["ServerTotal"] - timings["PipelineWall"], abs=0.01)
    assert any("num_frames 9" in w for w in body["warnings"])
    kept = [p for p in set(tcp_server.output_dir.glob("*.mp4")) - before if body["id"] in p.name]
    assert kept, "the video was not kept under --output-dir"
    umask = os.umask(0)
    os.umask(umask)
    assert kept[0].stat().st_mode & 0o777 == 0o666 & ~umask  # others may read it, as with any new file


def test_json_body_and_sync(tcp_server, tmp_path):
    """JSON bodies carry the image as a data URL or bare base64, and /v1/videos/sync answers raw
    video/mp4: if this fails, JSON clients or benchmark clients of vllm-omni's sync endpoint break."""
    b64 = base64.b64encode(_png()).decode()
    r = tcp_server.client.post(
        "/v1/videos", json={**_form(), "num_frames": 5, "input_reference": f"data:image/png;base64,{b64}"}
    )
    assert r.status_code == 200, r.text
    _check_mp4(base64.b64decode(r.json()["data"][0]["b64_json"]), tmp_path, 5, "64x48", 8)  # the tiny's 8 fps

    r = tcp_server.client.post("/v1/videos/sync", json={**_form(size="32x32"), "input_reference": b64})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    assert "PipelineWall;dur=" in r.headers["server-timing"]
    _check_mp4(r.content, tmp_path, 5, "32x32", 8)


def _run_curl_example(env: dict[str, str], out: Path, tmp_path: Path) -> None:
    """examples/curl_client.sh as a user runs it; its mp4 has 5 s x 16 fps = 81 frames."""
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / "curl_client.sh"), str(EXAMPLE_IMAGE), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _check_mp4(out.read_bytes(), tmp_path, 81, "32x32", 16)


def test_curl_client_example(tcp_server, tmp_path):
    """examples/curl_client.sh (vllm-omni's documented curl | jq | base64 style, seconds=5 at 16 fps)
    must work as written: if this fails, the README's first example is broken."""
    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.fail("curl and jq must be installed (apt-get install -y curl jq)")
    out = tmp_path / "out.mp4"
    env = dict(os.environ, BASE_URL=str(tcp_server.client.base_url).rstrip("/"), SIZE="32x32", NUM_INFERENCE_STEPS="2")
    _run_curl_example(env, out, tmp_path)


# -- bad requests: 4xx JSON naming the field, and the server goes on ----------------------------


def _truncated_png() -> bytes:
    data = _png()
    return data[: len(data) // 2]


BAD_FORMS = {  # name: (form overrides, upload bytes or None for the example image, status, field)
    "missing prompt": ({"prompt": None}, None, 400, "prompt"),
    "malformed size": ({"size": "big"}, None, 400, "size"),
    "size not a multiple of 16": ({"size": "65x48"}, None, 400, "size"),
    "size too large": ({"size": "4096x48"}, None, 400, "size"),
    "steps out of range": ({"num_inference_steps": "0"}, None, 400, "num_inference_steps"),
    "non-numeric seed": ({"seed": "abc"}, None, 400, "seed"),
    "non-numeric fps": ({"fps": "fast", "num_frames": None, "seconds": "1"}, None, 400, "fps"),
    "NaN guidance": ({"guidance_scale": "nan"}, None, 400, "guidance_scale"),
    "boundary outside [0,1]": ({"boundary_ratio": "1.5"}, None, 400, "boundary_ratio"),
    "non-image upload": ({}, b"just some text, not a picture", 400, "input_reference"),
    "truncated image": ({}, "truncated", 400, "input_reference"),
    "empty upload": ({}, b"", 400, "input_reference"),
    "upload over the limit": ({}, b"\x89PNG" + b"\0" * UPLOAD_LIMIT, 413, "input_reference"),
    "unknown model": ({"model": "wan-9000"}, None, 404, "model"),
}


@pytest.mark.parametrize("case", list(BAD_FORMS), ids=list(BAD_FORMS))
def test_bad_form_names_field(tcp_server, case):
    """Each bad input of the issue's list is refused on rank 0 with a 4xx JSON error naming the field:
    if this fails, a client cannot tell what to fix (or a bad request reached the ranks)."""
    overrides, upload, status, field = BAD_FORMS[case]
    upload = _truncated_png() if upload == "truncated" else _png() if upload is None else upload
    r = tcp_server.client.post(
        "/v1/videos", data=_form(**overrides), files={"input_reference": ("in.png", upload, "image/png")}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["code"] == status and error["message"]


def test_bad_bodies_name_field(tcp_server):
    """A body of the wrong type, broken JSON, or base64 that is not base64 gets a 4xx JSON error
    naming what is wrong, never a 500 or FastAPI's own error shape."""
    c = tcp_server.client
    r = c.post("/v1/videos", content=b"prompt=cat", headers={"Content-Type": "text/plain"})
    assert (r.status_code, r.json()["error"]["param"]) == (415, "Content-Type")
    r = c.post("/v1/videos", content=b'{"prompt": "cat",', headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "body")
    r = c.post("/v1/videos", json=["prompt", "cat"])
    assert (r.status_code, r.json()["error"]["param"]) == (400, "body")
    r = c.post("/v1/videos", json={**_form(), "input_reference": "not base64 at all!"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "input_reference")
    r = c.post("/v1/videos", json={**_form(), "input_reference": "https://example.com/cat.png"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "input_reference")
    big = base64.b64encode(b"\0" * (UPLOAD_LIMIT + 1)).decode()
    r = c.post("/v1/videos/sync", json={**_form(), "input_reference": big})
    assert (r.status_code, r.json()["error"]["param"]) == (413, "input_reference")
    png = base64.b64encode(_png()).decode()
    nan_body = json.dumps({**_form(), "guidance_scale": float("nan"), "input_reference": png})  # a bare NaN literal
    r = c.post("/v1/videos", content=nan_body, headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "guidance_scale")


def test_metrics_and_valid_request_after_bad_ones(tcp_server, tmp_path):
    """After all the bad requests above the loop still serves, and /metrics counts what happened:
    if this fails, bad input poisoned the loop or the operator's dashboards lie."""
    c = tcp_server.client
    ok_before = _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos", outcome="ok")
    invalid_before = _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos", outcome="invalid")
    walls_before = _metric(c, "wan_spmd_stage_seconds_count", stage="PipelineWall")
    assert invalid_before >= 10  # the bad forms above
    assert _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos", outcome="too_large") >= 1
    assert _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos", outcome="unknown_model") >= 1

    r = c.post("/v1/videos", data=_form(), files={"input_reference": ("in.png", _png(), "image/png")})
    assert r.status_code == 200, r.text
    _check_mp4(base64.b64decode(r.json()["data"][0]["b64_json"]), tmp_path, 5, "64x48", 8)
    r = c.post("/v1/videos", data=_form(size="1x1"), files={"input_reference": ("in.png", _png(), "image/png")})
    assert r.status_code == 400

    assert _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos", outcome="ok") == ok_before + 1
    assert _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos", outcome="invalid") == invalid_before + 1
    assert _metric(c, "wan_spmd_stage_seconds_count", stage="PipelineWall") == walls_before + 1
    assert _metric(c, "wan_spmd_queue_depth") == 0
    assert _metric(c, "wan_spmd_ready") == 1


# -- Unix socket and --api-key -------------------------------------------------------------------


def test_unix_socket_with_api_key(uds_server, tmp_path):
    """With --api-key, everything but /health needs the bearer key (401 JSON otherwise), over a Unix
    socket: if this fails, a keyed server is open to anyone or locks out its own clients."""
    c = uds_server.client
    assert c.get("/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        r = c.get(path)
        assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization", path
    r = c.post(
        "/v1/videos",
        data=_form(),
        files={"input_reference": ("in.png", _png(), "image/png")},
        headers={"Authorization": "Bearer wrong"},
    )
    assert r.status_code == 401

    keyed = {"Authorization": f"Bearer {API_KEY}"}
    assert c.get("/v1/models", headers=keyed).status_code == 200
    r = c.post(
        "/v1/videos/sync",
        data=_form(num_frames="9", fps="12"),
        files={"input_reference": ("in.png", _png(), "image/png")},
        headers=keyed,
    )
    assert r.status_code == 200, r.text
    _check_mp4(r.content, tmp_path, 9, "64x48", 12)
    unauthorized = _metric(c, "wan_spmd_requests_total", keyed, endpoint="/v1/videos", outcome="unauthorized")
    assert unauthorized == 1


def test_curl_client_over_unix_socket_with_key(uds_server, tmp_path):
    """The curl example also reaches a keyed server on a Unix socket (UDS and API_KEY variables)."""
    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.fail("curl and jq must be installed (apt-get install -y curl jq)")
    out = tmp_path / "out.mp4"
    env = dict(
        os.environ,
        BASE_URL="http://serve",
        UDS=str(uds_server.uds),
        API_KEY=API_KEY,
        SIZE="32x32",
        NUM_INFERENCE_STEPS="1",
    )
    _run_curl_example(env, out, tmp_path)


def test_sigterm_stops_cleanly_and_removes_socket(uds_server):
    """SIGTERM to the whole process group (as systemd or a terminal's kill does) stops both ranks
    within 30 s, each with status 0, without a traceback, leaving no worker behind and removing the
    Unix socket file: if this fails, a restarted server cannot bind its socket, or torchrun's
    --max-restarts would count a clean stop as a crash. (torchrun itself reports the signal with
    its own non-zero status and a SignalException.)"""
    assert uds_server.uds.exists()
    workers = uds_server.ranks()
    assert sorted(workers) == [0, 1]
    os.killpg(uds_server.proc.pid, signal.SIGTERM)
    uds_server.proc.wait(timeout=30)
    log = uds_server.log_text()
    assert "stopped after" in log, log
    assert "rank 0 exits with status 0" in log and "rank 1 exits with status 0" in log, log
    assert "[rank0]:" not in log and "[rank1]:" not in log, log  # torchrun's relay of a rank's traceback
    assert "SignalException" in log  # torchrun's own way of saying it was signalled
    assert not [pid for pid in workers.values() if alive(pid)]
    assert not uds_server.uds.exists()
