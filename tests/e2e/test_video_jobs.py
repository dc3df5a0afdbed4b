"""Video jobs (issue 16) as users drive them: the official `openai` package and plain HTTP against
real `torchrun --nproc-per-node 2 -m wan_spmd serve` (gloo, tiny model), then a SIGKILL and a
restart on the same --output-dir. One server for the module (shared for the session with
test_hostile_inputs), and one more for the restart.

The SDK's types name Sora's sizes only, so sizes the tiny model takes (and our own fields) go in
`extra_body`, as users pass extra fields; `seconds` goes as the SDK sends it, a string ("4")."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import EXAMPLE_IMAGE, ROOT
from tests.e2e.test_serve import Server, _check_mp4, _metric, _start, _stop

KEY = "jobs-key-42"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = EXAMPLE_IMAGE.read_bytes()

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK's note on Sora


def start_jobs(tmp: Path) -> Server:
    """The session's keyed TCP server (test_hostile_inputs' `server` too, whose 657 KB bomb the
    upload limit leaves room for)."""
    from tests.e2e.test_hostile_inputs import UPLOAD

    return _start(tmp, "--api-key", KEY, "--replica-name", "r1", "--max-upload-bytes", str(UPLOAD), headers=AUTH)


@pytest.fixture(scope="module")
def server(servers, tiny_i2v) -> Server:
    return servers.get("jobs", start_jobs)


@pytest.fixture(scope="module")
def jobs_tmp(server) -> Path:
    """The server's folder (its --output-dir is videos/ in it): the restart reuses it."""
    return server.output_dir.parent


def _sdk(server: Server) -> openai.OpenAI:
    base = str(server.client.base_url).rstrip("/")
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)


def _create(sdk: openai.OpenAI, steps: int, frames: int = 5, **extra) -> openai.types.Video:
    return sdk.videos.create(
        prompt="a cat on a boat",
        input_reference=("cat.png", PNG, "image/png"),
        extra_body={"size": "64x48", "num_frames": frames, "num_inference_steps": steps, "seed": 3, **extra},
    )


def _poll(sdk: openai.OpenAI, video_id: str, timeout: float = 60) -> tuple[openai.types.Video, list[int]]:
    """Retrieve until finished; the progress values seen on the way."""
    deadline, seen = time.monotonic() + timeout, []
    while True:
        video = sdk.videos.retrieve(video_id)
        seen.append(video.progress)
        if video.status in ("completed", "failed") or time.monotonic() > deadline:
            return video, seen
        time.sleep(0.05)


def _wait_progress(sdk: openai.OpenAI, video_id: str, at_least: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (progress := sdk.videos.retrieve(video_id).progress) < at_least:
        assert time.monotonic() < deadline, f"{video_id} stuck at {progress}%"
        time.sleep(0.05)
    return progress


# -- the SDK as a user drives it -----------------------------------------------------------------


def test_create_then_retrieve_until_completed(server):
    """The SDK's `create` comes back at once with a queued job whose id names the replica; `retrieve`
    then shows progress rising step by step to 100 when the mp4 exists. If this fails, SDK clients
    block for the whole video (and retry it), or cannot tell how far a job is."""
    sdk = _sdk(server)
    video = _create(sdk, steps=8)
    assert video.id.startswith("video_r1_") and (video.status, video.progress) == ("queued", 0)
    # 5 frames at 8 fps: `seconds` in whole seconds (clients call int() on it), the truth beside it
    assert (video.object, video.model, video.size, video.seconds) == ("video", "tiny", "64x48", "1")
    assert video.model_extra["duration_s"] == 0.625
    done, seen = _poll(sdk, video.id)
    assert (done.status, done.progress, done.error) == ("completed", 100, None), done
    assert seen == sorted(seen), seen  # never goes back
    within = sorted({p for p in seen if 0 < p < 100})
    assert len(within) >= 3, seen  # 8 steps: 12, 25, ... seen on the way
    assert all(p <= 99 for p in seen[:-1]) and seen[-1] == 100
    assert done.created_at <= done.completed_at and done.expires_at is None
    assert _metric(server.client, "wan_spmd_videos", status="completed") >= 1


def test_create_and_poll_download_and_thumbnail(server, tmp_path):
    """`create_and_poll` with `seconds="4"` (the SDK's string) gives 4 s x 8 fps -> 33 frames;
    `download_content` decodes to that size and frame count, the thumbnail is a JPEG of that size,
    and other variants are a 400 naming `variant`. If this fails, SDK users cannot fetch what they made."""
    sdk = _sdk(server)
    video = sdk.videos.create_and_poll(
        prompt="a cat on a boat",
        input_reference=("cat.png", PNG, "image/png"),
        seconds="4",
        extra_body={"size": "64x48", "num_inference_steps": 1},
        poll_interval_ms=100,
    )
    assert (video.status, video.seconds, video.num_frames, video.duration_s) == ("completed", "4", 33, 4.125), video
    _check_mp4(sdk.videos.download_content(video.id).content, tmp_path, 33, "64x48", 8)
    jpeg = sdk.videos.download_content(video.id, variant="thumbnail")
    assert jpeg.response.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(jpeg.content))
    assert (picture.format, picture.size) == ("JPEG", (64, 48))
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.videos.download_content(video.id, variant="spritesheet")
    assert bad.value.body["param"] == "variant" and "spritesheet is not offered" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve("video_r1_000000000000000000000000")


def test_plain_post_is_a_job_too(server, tmp_path):
    """Without --sync-videos a plain POST (no SDK headers, no Prefer) is answered like the SDK's: the
    queued job at once, fetched later by id. If this fails, requests, httpx and curl clients wait for
    the whole video and lose it to their timeouts."""
    form = {"prompt": "a cat", "size": "64x48", "num_frames": "5", "num_inference_steps": "2", "seed": "1"}
    files = {"input_reference": ("cat.png", PNG, "image/png")}
    r = server.client.post("/v1/videos", data=form, files=files)
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    done, _ = _poll(_sdk(server), r.json()["id"])
    assert done.status == "completed" and done.file_name == f"{done.id}.mp4"
    _check_mp4(server.client.get(f"/v1/videos/{done.id}/content").content, tmp_path, 5, "64x48", 8)


def test_list_pages(server):
    """`list` pages with limit/after/order as the SDK's auto-pagination reads them (has_more,
    last_id), newest first; a bad order is a 400 naming it, an unknown `after` an empty page. If this fails, a
    client cannot find its jobs or loops forever over pages."""
    sdk = _sdk(server)
    everything = server.client.get("/v1/videos", params={"limit": 100}).json()
    ids = [v["id"] for v in everything["data"]]
    assert len(ids) >= 3 and not everything["has_more"]
    created = [v["created_at"] for v in everything["data"]]
    assert created == sorted(created, reverse=True)
    first = sdk.videos.list(limit=2)
    assert [v.id for v in first.data] == ids[:2] and first.has_more
    assert [v.id for v in sdk.videos.list(limit=2)] == ids  # the SDK follows `after` page by page
    assert [v.id for v in sdk.videos.list(limit=3, order="asc")] == ids[::-1]
    r = server.client.get("/v1/videos", params={"order": "up"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "order"), r.text
    assert server.client.get("/v1/videos", params={"after": "video_r1_x"}).json()["data"] == []  # as vllm-omni


def test_delete_running_and_queued(server):
    """DELETE of a running job stops it at its next denoising step on every rank (the step
    agreement) while the loop goes on to the next job, which succeeds; a queued one deleted never
    starts; a finished one's files go; each id then answers 404. If this fails, deleted jobs keep
    the GPUs busy, desynchronise the ranks, or leave files behind."""
    sdk = _sdk(server)
    running = _create(sdk, steps=40)
    progress = _wait_progress(sdk, running.id, 5)  # two of 40 steps done
    after = _create(sdk, steps=2)
    queued = _create(sdk, steps=2)
    assert sdk.videos.retrieve(queued.id).status == "queued"

    gone = sdk.videos.delete(queued.id)
    assert (gone.id, gone.object, gone.deleted) == (queued.id, "video.deleted", True)
    at_delete = sdk.videos.retrieve(running.id).progress
    sdk.videos.delete(running.id)
    done, _ = _poll(sdk, after.id)
    assert done.status == "completed", done

    log = server.log_text()
    stopped = re.search(rf"video {running.id} cancelled at step (\d+) of 40: deleted", log)
    assert stopped, log
    assert progress * 40 // 100 <= int(stopped.group(1)) <= at_delete * 40 // 100 + 2, (at_delete, stopped.group(0))
    assert f"video {queued.id} started" not in log
    for video_id in (running.id, queued.id):
        with pytest.raises(openai.NotFoundError):
            sdk.videos.retrieve(video_id)
        assert not list(server.output_dir.glob(f"*{video_id}*"))

    files = list(server.output_dir.rglob(f"*{after.id}*"))
    assert {p.suffix for p in files} == {".mp4", ".json"}, files
    sdk.videos.delete(after.id)
    assert not list(server.output_dir.rglob(f"*{after.id}*"))
    assert server.client.get(f"/v1/videos/{after.id}/content").status_code == 404
    with pytest.raises(openai.NotFoundError):
        sdk.videos.delete(after.id)


def test_unserved_endpoints_and_the_key(server):
    """OpenAI's remix, edits, extensions and characters answer a 404 saying they are not served; every
    job endpoint needs the API key. If this fails, clients get a confusing 405/500, or anyone can
    list, download or delete the videos of a keyed server."""
    sdk = _sdk(server)
    video_id = server.client.get("/v1/videos", params={"limit": 1}).json()["data"][0]["id"]
    with pytest.raises(openai.NotFoundError, match="remix"):
        sdk.videos.remix(video_id, prompt="again")
    for path in ("/v1/videos/edits", "/v1/videos/extensions", "/v1/videos/characters"):
        r = server.client.post(path, data={"prompt": "x"})
        assert r.status_code == 404 and "not served" in r.json()["error"]["message"], (path, r.text)
    assert server.client.get("/v1/videos/characters/char_1").status_code == 404
    bare = httpx.Client(base_url=server.client.base_url)
    for method, path in (
        ("GET", "/v1/videos"),
        ("GET", f"/v1/videos/{video_id}"),
        ("GET", f"/v1/videos/{video_id}/content"),
        ("DELETE", f"/v1/videos/{video_id}"),
    ):
        assert bare.request(method, path).status_code == 401, (method, path)
    assert server.client.get(f"/v1/videos/{video_id}").status_code == 200  # the DELETE above did nothing


def test_examples_openai_client_and_curl_loop(server, tmp_path):
    """examples/openai_client.py (which reads the model's limits from /v1/models) and
    examples/curl_async.sh as a user runs them: if this fails, the README's asynchronous examples
    are broken."""
    if shutil.which("jq") is None or shutil.which("curl") is None:
        pytest.fail("curl and jq must be installed (apt-get install -y curl jq)")
    base = str(server.client.base_url).rstrip("/")
    env = dict(os.environ, API_KEY=KEY, SIZE="32x32", NUM_INFERENCE_STEPS="1", PYTHONWARNINGS="ignore")
    out = tmp_path / "sdk.mp4"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "openai_client.py"), str(EXAMPLE_IMAGE), str(out)],
        capture_output=True,
        text=True,
        env={**env, "BASE_URL": f"{base}/v1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _check_mp4(out.read_bytes(), tmp_path, 33, "32x32", 8)  # SECONDS 4 x the tiny's 8 fps
    out = tmp_path / "curl.mp4"
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / "curl_async.sh"), str(EXAMPLE_IMAGE), str(out)],
        capture_output=True,
        text=True,
        env={**env, "BASE_URL": base},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "completed 100%" in done.stdout, done.stdout
    _check_mp4(out.read_bytes(), tmp_path, 81, "32x32", 16)


# -- a restart -------------------------------------------------------------------------------------


def test_restart_keeps_finished_jobs_and_fails_the_running_one(server, jobs_tmp, tmp_path):
    """SIGKILL to torchrun's process group (and its ranks) with one job finished and one running,
    then a new server on the same --output-dir: the finished one is still listed and downloads the
    same bytes, the running one is failed saying the server restarted. If this fails, a crash (or
    torchrun --max-restarts, systemd) loses finished videos or leaves jobs in_progress forever."""
    sdk = _sdk(server)
    finished, _ = _poll(sdk, _create(sdk, steps=2).id)
    assert finished.status == "completed"
    mp4 = sdk.videos.download_content(finished.id).content
    running = _create(sdk, steps=40)
    _wait_progress(sdk, running.id, 3)
    _stop(server.proc, signal.SIGKILL)

    again = _start(jobs_tmp, "--api-key", KEY, "--replica-name", "r1", headers=AUTH)
    try:
        sdk = _sdk(again)
        video = sdk.videos.retrieve(finished.id)
        assert (video.status, video.progress) == ("completed", 100)
        assert sdk.videos.download_content(finished.id).content == mp4
        failed = sdk.videos.retrieve(running.id)
        assert failed.status == "failed" and failed.error.code == "server_restarted", failed
        assert "restarted" in failed.error.message
        with pytest.raises(openai.UnprocessableEntityError):  # vllm-omni's status: it will never have content
            sdk.videos.download_content(running.id)
        listed = {v.id: v.status for v in sdk.videos.list(limit=100)}
        assert (listed[finished.id], listed[running.id]) == ("completed", "failed")
        assert _metric(again.client, "wan_spmd_videos", status="in_progress") == 0
        assert re.search(r"\d+ job\(s\) from earlier runs", again.log_text())
    finally:
        again.client.close()
        _stop(again.proc)
