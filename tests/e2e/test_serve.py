"""`wan_spmd serve` as a user drives it: real `torchrun --nproc-per-node 2` (gloo, tiny model), a real
HTTP client over the real socket (TCP and a Unix socket). Two servers, each reused by many requests
(the TCP one shared for the session with test_hostile_http), so the module stays fast."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLE_IMAGE, ROOT, cli_env, run_cli
from wan_spmd.video import probe_mp4

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK's note on Sora
START_TIMEOUT_S = 120
UPLOAD_LIMIT = 64 * 1024  # --max-upload-bytes for these servers, so a 413 costs little to provoke
API_KEY = "test-key-123"
ALIAS = "wan2.2-tiny"


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
    entry: str = "wan_spmd",
    out: Path | None = None,
) -> Server:
    """`torchrun -m ENTRY serve ...` (ENTRY: wan_spmd, or a test-only entry point such as tests.fault_serve)."""
    log, out = tmp / "serve.log", out or tmp / "videos"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *torchrun]
    cmd += ["-m", entry, "serve", "--model", "tiny", "--output-dir", str(out)]
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
def uds_server(tmp_path_factory, tiny_i2v) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-uds")
    # vllm-omni's earlier synchronous API, and a second served name (an alias)
    names = ("--served-model-name", "tiny", "--served-model-name", ALIAS)
    server = _start(tmp, "--api-key", API_KEY, "--sync-videos", *names, uds=tmp / "wan.sock")
    yield server
    server.client.close()
    _stop(server.proc)


def _form(**overrides: str) -> dict[str, str]:
    fields = {"prompt": "a cat on a boat", "size": "64x48", "num_frames": "5", "num_inference_steps": "2", "seed": "7"}
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not None}


def _png() -> bytes:
    return EXAMPLE_IMAGE.read_bytes()


def poll(client: httpx.Client, video_id: str, timeout: float = 60) -> dict:
    """GET the job until it is finished (each answer is immediate; the loop ends on the status)."""
    deadline = time.monotonic() + timeout
    while True:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in ("completed", "failed"):
            return video
        assert time.monotonic() < deadline, video
        time.sleep(0.05)


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
    (card,) = c.get("/v1/models").json()["data"]
    # the tiny model's rotary table has 32 positions: 32 x 16 px, and (32 - 1) x 4 + 1 frames
    limits = ("max_width", "max_height", "size_multiple", "max_frames", "image", "default_max_area")
    assert card["id"] == "tiny" and [card[k] for k in limits] == [512, 512, 16, 125, "required", "64x64"]
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/videos", "/v1/videos/sync", "/health", "/v1/models", "/metrics"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/videos"]["post"]["requestBody"]["content"]
    assert c.get("/docs").status_code == 404  # FastAPI's page would load its scripts from a CDN


def test_multipart_video(tcp_server, tmp_path):
    """A multipart upload as vllm-omni takes it is a job, queued at once with no flag (OpenAI's and
    vllm-omni's API), then completed as a playable mp4 with the asked-for frames (seconds x fps
    rounded to 4k+1), size and fps, kept under --output-dir, with vllm-omni's record fields and our
    timings. If this fails, HTTP clients wait for the whole video again, or cannot read the job."""
    before = set(tcp_server.output_dir.glob("*.mp4")) if tcp_server.output_dir.exists() else set()
    r = tcp_server.client.post(
        "/v1/videos",
        data=_form(num_frames=None, seconds="1", fps="8"),
        files={"input_reference": ("cat.png", _png(), "image/png")},
        headers={"Accept": "application/json"},
    )
    assert r.status_code == 200, r.text
    queued = r.json()
    assert (queued["status"], queued["progress"], r.headers["x-request-id"]) == ("queued", 0, queued["id"])
    assert queued["id"].startswith("video_") and queued["model"] == r.headers["x-model"] == "tiny"
    body = poll(tcp_server.client, queued["id"])
    assert (body["status"], body["num_frames"], body["size"], body["fps"], body["seed"]) == (
        "completed",
        9,
        "64x48",
        8,
        7,
    )
    assert (body["seconds"], body["duration_s"], body["file_name"]) == ("1", 1.125, f"{body['id']}.mp4")
    assert body["peak_memory_mb"] is None and body["quality"] == "default" and body["adjusted"] == {}
    content = tcp_server.client.get(f"/v1/videos/{body['id']}/content")
    _check_mp4(content.content, tmp_path, 9, "64x48", 8)
    timings = body["timings"]
    for stage in (
        "TextEncoding",
        "LatentPreparation",
        "Denoising",
        "Decoding",
        "PipelineWall",
        "Queue",
        "Dispatch",
        "Mp4Encoding",
    ):
        assert timings[stage] >= 0, stage
        assert body["stage_durations"][stage] == pytest.approx(timings[stage] / 1000, abs=1e-3)
    wall_s = (timings["PipelineWall"] + timings["Dispatch"] + timings["Mp4Encoding"]) / 1000
    assert body["inference_time_s"] == pytest.approx(wall_s, abs=1e-3)
    assert any("num_frames 9" in w for w in body["warnings"])
    kept = [p for p in set(tcp_server.output_dir.glob("*.mp4")) - before if body["id"] in p.name]
    assert kept, "the video was not kept under --output-dir"
    umask = os.umask(0)
    os.umask(umask)
    assert kept[0].stat().st_mode & 0o777 == 0o666 & ~umask  # others may read it, as with any new file


def test_json_body_and_sync(tcp_server, tmp_path):
    """JSON bodies carry the image as a data URL or bare base64, and /v1/videos/sync answers raw
    video/mp4 with vllm-omni's headers (X-Request-Id, X-Model, X-Inference-Time-S, X-Stage-Durations
    as JSON seconds; no X-Peak-Memory-MB on the CPU, where nothing is measured): if this fails, JSON clients or
    benchmark clients of vllm-omni's sync endpoint break."""
    b64 = base64.b64encode(_png()).decode()
    r = tcp_server.client.post(
        "/v1/videos", json={**_form(), "num_frames": 5, "input_reference": f"data:image/png;base64,{b64}"}
    )
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    assert poll(tcp_server.client, r.json()["id"])["status"] == "completed"
    _check_mp4(tcp_server.client.get(f"/v1/videos/{r.json()['id']}/content").content, tmp_path, 5, "64x48", 8)

    r = tcp_server.client.post("/v1/videos/sync", json={**_form(size="32x32"), "input_reference": b64})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    assert "PipelineWall;dur=" in r.headers["server-timing"]
    assert r.headers["x-request-id"] == r.headers["x-video-id"] and r.headers["x-model"] == "tiny"
    stages = json.loads(r.headers["x-stage-durations"])
    assert stages["PipelineWall"] > 0 and 0 < float(r.headers["x-inference-time-s"]) < stages["ServerTotal"]
    assert "x-peak-memory-mb" not in r.headers and "x-adjusted" not in r.headers
    _check_mp4(r.content, tmp_path, 5, "32x32", 8)


def _run_curl_example(env: dict[str, str], out: Path, tmp_path: Path) -> None:
    """examples/curl_client.sh as a user runs it (B64=1 in `env`: the base64 answer of a server run
    with --sync-videos); its mp4 has 5 s x 16 fps = 81 frames."""
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
    """examples/curl_client.sh (one curl call to /v1/videos/sync, seconds=5 at 16 fps) must work as
    written on a server started with no flags: if this fails, the README's first example is broken."""
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
    "size not a multiple of 16 (strict)": ({"size": "65x48", "strict": "true"}, None, 400, "size"),
    "frames not 4k+1 (strict)": ({"num_frames": "8", "strict": "1"}, None, 400, "num_frames"),
    "size under the multiple": ({"size": "8x48"}, None, 400, "size"),
    "size too large": ({"size": "4096x48"}, None, 400, "size"),
    "size over the model's rotary table": ({"size": "528x48"}, None, 400, "size"),
    "frames over the model's rotary table": ({"num_frames": "129"}, None, 400, "num_frames"),
    "file_id reference": ({"image_reference": '{"file_id": "file_123"}'}, None, 400, "image_reference"),
    "two images": ({"image_reference": '{"image_url": "data:image/png;base64,AAAA"}'}, None, 400, "image_reference"),
    "video_reference": ({"video_reference": "x.mp4"}, None, 400, "video_reference"),
    "reference_url": ({"reference_url": "https://example.com/cat.png"}, None, 400, "reference_url"),
    "per-request lora": ({"lora": '{"name": "x", "path": "/x"}'}, None, 400, "lora"),
    "extra_params": ({"extra_params": '{"sample_solver": "euler"}'}, None, 400, "extra_params"),
    "n over 1": ({"n": "2"}, None, 400, "n"),
    "generate_sound": ({"generate_sound": "true"}, None, 400, "generate_sound"),
    "frame interpolation": ({"enable_frame_interpolation": "true"}, None, 400, "enable_frame_interpolation"),
    "quality": ({"quality": "hd"}, None, 400, "quality"),
    "strict not a bool": ({"strict": "maybe"}, None, 400, "strict"),
    "steps out of range": ({"num_inference_steps": "0"}, None, 400, "num_inference_steps"),
    "non-numeric seed": ({"seed": "abc"}, None, 400, "seed"),
    "non-numeric fps": ({"fps": "fast", "num_frames": None, "seconds": "1"}, None, 400, "fps"),
    "NaN guidance": ({"guidance_scale": "nan"}, None, 400, "guidance_scale"),
    "boundary outside [0,1]": ({"boundary_ratio": "1.5"}, None, 400, "boundary_ratio"),
    "non-image upload": ({}, b"just some text, not a picture", 400, "input_reference"),
    "truncated image": ({}, "truncated", 400, "input_reference"),
    "empty upload": ({}, b"", 400, "input_reference"),
    "upload over the limit": ({}, b"\x89PNG" + b"\0" * UPLOAD_LIMIT, 413, "input_reference"),
    "unknown model": ({"model": "sora-2"}, None, 400, "model"),
}


@pytest.mark.parametrize("case", list(BAD_FORMS), ids=list(BAD_FORMS))
def test_bad_form_names_field(tcp_server, case):
    """Each bad input is refused on rank 0 with a 4xx JSON error naming the field, a string `code` as
    OpenAI's clients read it; a field that would change the video and that we cannot honour is
    refused by name, never ignored: if this fails, a client cannot tell what to fix, gets a video it
    did not ask for, or a request the model cannot take reaches the ranks (and fails there)."""
    overrides, upload, status, field = BAD_FORMS[case]
    upload = _truncated_png() if upload == "truncated" else _png() if upload is None else upload
    r = tcp_server.client.post(
        "/v1/videos", data=_form(**overrides), files={"input_reference": ("in.png", upload, "image/png")}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    codes = {400: "invalid_request", 413: "request_too_large"}
    assert error["param"] == field and error["code"] == codes[status] and error["message"]


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
    ok_before = _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos", outcome="accepted")
    invalid_before = _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos", outcome="invalid")
    walls_before = _metric(c, "wan_spmd_stage_seconds_count", stage="PipelineWall")
    assert invalid_before >= 10  # the bad forms above
    assert _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos", outcome="too_large") >= 1

    r = c.post("/v1/videos", data=_form(), files={"input_reference": ("in.png", _png(), "image/png")})
    assert r.status_code == 200, r.text
    assert poll(c, r.json()["id"])["status"] == "completed"
    _check_mp4(c.get(f"/v1/videos/{r.json()['id']}/content").content, tmp_path, 5, "64x48", 8)
    r = c.post("/v1/videos", data=_form(size="1x1"), files={"input_reference": ("in.png", _png(), "image/png")})
    assert r.status_code == 400

    assert _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos", outcome="accepted") == ok_before + 1
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


def test_sync_videos_aliases_and_a_dropped_sync_client(uds_server, tmp_path):
    """With --sync-videos a plain POST waits and answers vllm-omni's earlier shape (the completed
    object, the mp4 in data[0].b64_json) with vllm-omni's headers, while `Prefer: respond-async`
    and the OpenAI SDK still get a queued job; every --served-model-name is listed with the model's
    limits and may be asked for by name, another name is a 400 listing them; a synchronous client
    that hangs up cancels its job, whose content is then a 422. If this fails, scripts written for
    the synchronous API break, aliases do not resolve, or abandoned synchronous jobs hold the GPUs."""
    import openai

    keyed = {"Authorization": f"Bearer {API_KEY}"}
    c = uds_server.client
    cards = c.get("/v1/models", headers=keyed).json()["data"]
    assert [(m["id"], m["max_width"], m["max_frames"]) for m in cards] == [("tiny", 512, 125), (ALIAS, 512, 125)]
    files = {"input_reference": ("in.png", _png(), "image/png")}
    r = c.post("/v1/videos", data=_form(model=ALIAS), files=files, headers=keyed)
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    assert (r.headers["x-model"], r.json()["model"], r.headers["x-request-id"]) == (ALIAS, ALIAS, r.json()["id"])
    assert float(r.headers["x-inference-time-s"]) > 0 and "Base64" in json.loads(r.headers["x-stage-durations"])
    _check_mp4(base64.b64decode(r.json()["data"][0]["b64_json"]), tmp_path, 5, "64x48", 8)
    r = c.post("/v1/videos", data=_form(), files=files, headers={**keyed, "Prefer": "respond-async"})
    assert r.json()["status"] == "queued" and r.headers["preference-applied"] == "respond-async"
    sdk = openai.OpenAI(
        base_url="http://serve/v1", api_key=API_KEY, max_retries=0, http_client=httpx.Client(transport=c._transport)
    )
    assert (
        sdk.videos.create(prompt="sdk", input_reference=files["input_reference"], extra_body=SDK_BODY).status
        == "queued"
    )
    r = c.post("/v1/videos", data=_form(model="sora-2"), files=files, headers=keyed)
    assert r.status_code == 400 and f"tiny, {ALIAS}" in r.json()["error"]["message"], r.text

    prompt = f"hung up {time.monotonic_ns()}"
    request = httpx.Request(
        "POST",
        "http://serve/v1/videos",
        data=_form(prompt=prompt, num_inference_steps="40"),
        files=files,
        headers=keyed,
    )
    body = request.read()
    head = "POST /v1/videos HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in request.headers.items()) + "\r\n"
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(uds_server.uds))
    sock.sendall(head.encode() + body)
    deadline = time.monotonic() + 60
    while not (mine := [v for v in c.get("/v1/videos", headers=keyed).json()["data"] if v["prompt"] == prompt]) or (
        mine[0]["progress"] == 0
    ):
        assert time.monotonic() < deadline, mine
        time.sleep(0.05)
    sock.close()
    video = poll(httpx.Client(base_url="http://serve", transport=c._transport, headers=keyed), mine[0]["id"])
    assert (video["status"], video["error"]["code"]) == ("failed", "cancelled"), video
    r = c.get(f"/v1/videos/{video['id']}/content", headers=keyed)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "video_failed"), r.text


def test_curl_client_over_unix_socket_with_key(uds_server, tmp_path):
    """The curl example also reaches a keyed server on a Unix socket (UDS and API_KEY variables), in
    vllm-omni's earlier base64 style against a server run with --sync-videos: if this fails, scripts
    written for the synchronous API have no way back."""
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
        B64="1",  # vllm-omni's earlier curl | jq .data[0].b64_json | base64 -d: the server runs --sync-videos
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


# -- the clients people already have (OpenAI's SDK, vllm-omni's clients), against a server with no flags --

SDK_BODY = {"size": "64x48", "num_frames": 5, "num_inference_steps": 2, "seed": 3}


def _sdk(server: Server, **kw):
    import openai

    base = f"{str(server.client.base_url).rstrip('/')}/v1"
    return openai.OpenAI(base_url=base, api_key="unused", **kw), openai.AsyncOpenAI(
        base_url=base, api_key="unused", **kw
    )


def test_openai_sdk_drives_every_videos_method(tcp_server, tmp_path):
    """The official `openai` package, sync and async clients, drives every `client.videos` method
    against a server started with no flags: create (queued at once), retrieve, poll,
    create_and_poll, list, download_content (video and thumbnail), delete; remix, edit, extend and
    the characters API are a 404 that says they are not served. If this fails, SDK users cannot use
    the server as they use OpenAI's."""
    import asyncio

    import openai

    sdk, async_sdk = _sdk(tcp_server, max_retries=0)
    png = ("cat.png", _png(), "image/png")
    video = sdk.videos.create(prompt="sdk sync", input_reference=png, seconds="4", extra_body=SDK_BODY)
    assert (video.status, video.seconds, video.model) == ("queued", "1", "tiny")  # num_frames decided: 0.625 s
    done = sdk.videos.poll(video.id, poll_interval_ms=50)
    assert (done.status, done.progress, sdk.videos.retrieve(video.id).status) == ("completed", 100, "completed")
    _check_mp4(sdk.videos.download_content(video.id).content, tmp_path, 5, "64x48", 8)
    assert sdk.videos.download_content(video.id, variant="thumbnail").response.headers["content-type"] == "image/jpeg"
    seconds = sdk.videos.create_and_poll(
        prompt="sdk seconds",
        input_reference=png,
        seconds="4",
        extra_body={"num_inference_steps": 1},
        poll_interval_ms=50,
    )
    # the SDK's seconds come back as sent; 4 s x 8 fps rounded to 4k+1 = 33 frames is the truth
    assert (seconds.status, seconds.seconds, seconds.model_extra["duration_s"]) == ("completed", "4", 4.125)
    # OpenAI's JSON-safe reference through the SDK (its `input_reference` takes files only, so
    # extra_body; the SDK writes the object as `image_reference[image_url]` form fields)
    data_url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    referenced = sdk.videos.create(
        prompt="sdk ref", extra_body={**SDK_BODY, "image_reference": {"image_url": data_url}}
    )
    assert sdk.videos.poll(referenced.id, poll_interval_ms=50).status == "completed"
    sdk.videos.delete(referenced.id)
    listed = [v.id for v in sdk.videos.list(limit=1)]  # the SDK follows `after` page by page
    assert listed[:2] == [seconds.id, video.id]
    for unserved in (
        lambda: sdk.videos.remix(video.id, prompt="again"),
        lambda: sdk.videos.edit(prompt="x", video=("v.mp4", b"x", "video/mp4")),
        lambda: sdk.videos.extend(prompt="x", seconds="4", video=("v.mp4", b"x", "video/mp4")),
        lambda: sdk.videos.create_character(name="c", video=("v.mp4", b"x", "video/mp4")),
        lambda: sdk.videos.get_character("char_1"),
    ):
        with pytest.raises(openai.NotFoundError, match="not served"):
            unserved()
    assert sdk.videos.delete(seconds.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(seconds.id)

    async def drive() -> None:
        created = await async_sdk.videos.create(prompt="sdk async", input_reference=png, extra_body=SDK_BODY)
        assert created.status == "queued"
        finished = await async_sdk.videos.poll(created.id, poll_interval_ms=50)
        assert finished.status == "completed" and (await async_sdk.videos.retrieve(created.id)).progress == 100
        polled = await async_sdk.videos.create_and_poll(
            prompt="sdk async poll", input_reference=png, extra_body=SDK_BODY, poll_interval_ms=50
        )
        assert polled.status == "completed"
        mp4 = (await async_sdk.videos.download_content(polled.id)).content
        _check_mp4(mp4, tmp_path, 5, "64x48", 8)
        page = await async_sdk.videos.list(limit=2, order="desc")
        assert [v.id for v in page.data] == [polled.id, created.id]
        assert (await async_sdk.videos.delete(created.id)).deleted
        with pytest.raises(openai.NotFoundError, match="not served"):
            await async_sdk.videos.remix(polled.id, prompt="again")
        await async_sdk.close()

    asyncio.run(drive())


TIMEOUT_S = 2.0


def test_sdk_job_longer_than_its_read_timeout(tcp_server):
    """The SDK with a read timeout far shorter than the job, and its default retries, gets the queued
    job at once and polls it to the end: one job, completed, never cancelled or started twice. If
    this fails, a client with a 60-300 s timeout loses long videos (cancelled as 'client went
    away') or starts each one up to three times."""
    sdk, _ = _sdk(tcp_server, timeout=TIMEOUT_S)  # max_retries stays the SDK's default (2)
    prompt = f"long job {time.monotonic_ns()}"
    body = {**SDK_BODY, "num_inference_steps": 16}  # about 0.3 s a step on the tiny model: 5 s
    video = sdk.videos.create(prompt=prompt, input_reference=("cat.png", _png(), "image/png"), extra_body=body)
    done = sdk.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed", done
    assert done.model_extra["inference_time_s"] > TIMEOUT_S, "the job did not outlast the client's timeout"
    mine = [
        v for v in tcp_server.client.get("/v1/videos", params={"limit": 100}).json()["data"] if v["prompt"] == prompt
    ]
    assert [v["id"] for v in mine] == [video.id]
    assert (
        f"video {video.id} started" in tcp_server.log_text()
        and f"video {video.id} cancelled" not in tcp_server.log_text()
    )


def test_async_videos_flag_is_a_deprecated_no_op(tiny_i2v):
    """`--async-videos` (the old switch to today's default) still parses and says it does nothing,
    so scripts that pass it keep starting; here the start stops at a bad --port, before loading."""
    done = run_cli(["serve", "--model", "tiny", "--async-videos", "--port", "70000"], timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--async-videos is deprecated and does nothing" in done.stderr and "--port" in done.stderr


def test_vllm_omni_client_unchanged(tcp_server, tmp_path):
    """A client written for vllm-omni's /v1/videos works unchanged: a multipart form with width,
    height, a frame count that is not 4k+1, true_cfg_scale, an image_reference JSON field, and
    metadata such as `user`; it reads `.id`, polls, downloads. The size and frames are rounded as
    diffusers rounds (down to the multiple; n // 4 * 4 + 1) and the values used are reported in the
    record and the X-Adjusted header. If this fails, vllm-omni's users must change their clients."""
    data_url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    form = {
        "prompt": "a cat",
        "width": "72",
        "height": "40",
        "num_frames": "8",
        "fps": "8",
        "num_inference_steps": "2",
        "true_cfg_scale": "1.5",
        "seed": "5",
        "user": "someone",
        "image_reference": json.dumps({"image_url": data_url}),
    }
    r = tcp_server.client.post("/v1/videos", files={k: (None, v) for k, v in form.items()})  # multipart, as `curl -F`
    assert r.status_code == 200, r.text
    assert r.headers["x-adjusted"] == "width=72x40->64x32, num_frames=8->9"
    video = poll(tcp_server.client, r.json()["id"])
    assert (video["status"], video["size"], video["num_frames"]) == ("completed", "64x32", 9), video
    assert video["adjusted"] == {
        "width": {"requested": "72x40", "used": "64x32"},
        "num_frames": {"requested": "8", "used": "9"},
    }
    assert any("true_cfg_scale used as guidance_scale" in w for w in video["warnings"])
    assert any("user" in w for w in video["warnings"])  # metadata: named, changes nothing
    _check_mp4(tcp_server.client.get(f"/v1/videos/{video['id']}/content").content, tmp_path, 9, "64x32", 8)
    # OpenAI's JSON shape of the same reference, in a JSON body; file ids are refused by name
    r = tcp_server.client.post("/v1/videos", json={**_form(), "input_reference": {"image_url": data_url}})
    assert r.status_code == 200 and poll(tcp_server.client, r.json()["id"])["status"] == "completed", r.text
    r = tcp_server.client.post("/v1/videos", json={**_form(), "input_reference": {"file_id": "file_1"}})
    assert r.status_code == 400 and "no file store" in r.json()["error"]["message"], r.text
    for extra, field in (
        ({"extra_body": {"seed": 1}}, "extra_body"),
        ({"n": 2}, "n"),
        ({"lora": {"name": "x"}}, "lora"),
    ):
        r = tcp_server.client.post("/v1/videos", json={**_form(), **extra, "input_reference": data_url})
        assert (r.status_code, r.json()["error"]["param"]) == (400, field), r.text


def test_dropped_async_client_and_list_semantics(tcp_server):
    """A client that gives up right after create (a 60 s timeout, a crash) leaves its job running to
    completion; list answers limit=0, an unknown `after` and `order` in any case as vllm-omni does.
    If this fails, asynchronous jobs die with their connection, or list-paging clients break."""
    with httpx.Client(base_url=tcp_server.client.base_url, timeout=5) as gone:
        r = gone.post("/v1/videos", data=_form(), files={"input_reference": ("in.png", _png(), "image/png")})
    assert r.status_code == 200 and poll(tcp_server.client, r.json()["id"])["status"] == "completed"
    c = tcp_server.client
    empty = c.get("/v1/videos", params={"limit": 0}).json()
    assert (empty["data"], empty["has_more"]) == ([], True)
    unknown = c.get("/v1/videos", params={"after": "video_nowhere_0"}).json()
    assert (unknown["data"], unknown["has_more"]) == ([], False)
    oldest = c.get("/v1/videos", params={"limit": 1, "order": "ASC"}).json()["data"]
    newest = c.get("/v1/videos", params={"limit": 1}).json()["data"]
    assert oldest[0]["created_at"] <= newest[0]["created_at"] and newest[0]["id"] == r.json()["id"]
    for params, field in (({"order": "up"}, "order"), ({"limit": 101}, "limit")):
        r = c.get("/v1/videos", params=params)
        assert (r.status_code, r.json()["error"]["param"]) == (400, field), r.text
