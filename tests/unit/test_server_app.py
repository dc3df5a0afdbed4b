"""The HTTP app and its queue without processes: a fake SPMD loop thread resolves the futures."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.conftest import EXAMPLE_IMAGE
from wan_spmd.config import generation_defaults, inspect_model_folder
from wan_spmd.params import Limits
from wan_spmd.server.app import ServerContext, ServerSettings, create_app
from wan_spmd.server.queue import Closed, JobFailed, JobQueue, PendingVideo, Unavailable, VideoAnswer

FORM = {"prompt": "a cat", "size": "64x48", "num_frames": "5", "num_inference_steps": "2", "seed": "3"}
PIPELINE_MS = {"TextEncoding": 1.0, "LatentPreparation": 2.0, "Denoising": 3.0, "Decoding": 4.0, "PipelineWall": 10.0}


def _files() -> dict:
    return {"input_reference": ("cat.png", EXAMPLE_IMAGE.read_bytes(), "image/png")}


@pytest.fixture
def ctx(tiny_i2v) -> ServerContext:
    info = inspect_model_folder(tiny_i2v)
    settings = ServerSettings(
        info=info, defaults=generation_defaults(info), served_model_name="tiny", limits=Limits(), sync_videos=True
    )  # the synchronous answer's shape is what these tests read
    return ServerContext(settings, JobQueue(max_size=1))


class FakeLoop:
    """Stands in for the SPMD loop: takes jobs off the queue and answers each with `reply`."""

    def __init__(self, queue: JobQueue, reply) -> None:
        self.queue, self.reply, self.seen = queue, reply, []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while (item := self.queue.take(0.05)) is not Closed:
            if item is not None:
                self.seen.append(item)
                self.reply(item)


@pytest.fixture
def client(ctx) -> Iterator[TestClient]:
    with TestClient(create_app(ctx)) as c:
        yield c
    ctx.queue.close("test over")


def test_health_and_videos_are_503_until_ready(ctx, client):
    """Until every rank has loaded, /health is 503 (so no load balancer sends work) and video requests
    are refused with 503 + Retry-After rather than queued behind a load that may fail."""
    assert client.get("/health").status_code == 503
    r = client.post("/v1/videos", data=FORM, files=_files())
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "unavailable"
    ctx.mark_ready()
    assert client.get("/health").json() == {"status": "ok", "ranks": 1}


def test_answer_shape_and_timings(ctx, client):
    """The JSON answer carries the mp4 as base64, the resolved parameters and every timing with
    Overhead = ServerTotal - PipelineWall: a benchmark reads these to hold e2e against PipelineWall."""
    ctx.mark_ready()
    mp4 = b"\x00\x00\x00\x18ftypisom fake mp4"
    loop = FakeLoop(ctx.queue, lambda p: p.resolve(VideoAnswer(mp4=mp4, path="/x.mp4", timings_ms=dict(PIPELINE_MS))))
    r = client.post("/v1/videos", data=FORM, files=_files())
    assert r.status_code == 200, r.text
    body = r.json()
    assert base64.b64decode(body["data"][0]["b64_json"]) == mp4
    assert (body["num_frames"], body["size"], body["seed"], body["model"]) == (5, "64x48", 3, "tiny")
    t = body["timings"]
    assert list(t)[:5] == list(PIPELINE_MS)
    assert t["Overhead"] == pytest.approx(t["ServerTotal"] - 10.0, abs=0.01)
    assert loop.seen[0].params.prompt == "a cat"
    r = client.post(
        "/v1/videos/sync", json={**FORM, "input_reference": base64.b64encode(EXAMPLE_IMAGE.read_bytes()).decode()}
    )
    assert r.status_code == 200 and r.content == mp4 and r.headers["content-type"] == "video/mp4"


def test_queue_full_is_429_with_retry_after(ctx, client):
    """With --max-queue requests already waiting, a new one gets 429 and Retry-After at once (the
    HTTP thread never blocks on a full queue)."""
    ctx.mark_ready()
    blocker = ctx.queue.submit(PendingVideo(id="waiting", params=None, created=0))  # nobody takes it
    r = client.post("/v1/videos", data=FORM, files=_files())
    assert r.status_code == 429 and r.headers["retry-after"]
    assert 'outcome="queue_full"' in client.get("/metrics").text
    blocker.resolve(error=Unavailable("test over"))


@pytest.mark.parametrize(
    "error, status", [(JobFailed("rank 1: OOM"), 500), (Unavailable("the server is shutting down"), 503)]
)
def test_job_errors_become_json(ctx, client, error, status):
    """A job that fails on some rank, or is dropped at shutdown, is answered (never left hanging)
    with the error JSON and the reason."""
    ctx.mark_ready()
    FakeLoop(ctx.queue, lambda p: p.resolve(error=error))
    r = client.post("/v1/videos", data=FORM, files=_files())
    assert r.status_code == status and str(error) in r.json()["error"]["message"]
    assert ("retry-after" in r.headers) == (status == 503)  # a load balancer may retry a 503, not a 500


def test_close_answers_waiting_and_take_skips_cancelled():
    """Closing the queue answers every waiting request (503), and a request whose client left is
    never run: if this fails, a shutdown leaves clients hanging or GPUs work for nobody."""
    queue = JobQueue(max_size=3)
    gone, kept = PendingVideo("gone", None, 0), PendingVideo("kept", None, 0)
    queue.submit(gone)
    queue.submit(kept)
    gone.cancelled = True
    assert queue.take(0) is kept
    waiting = queue.submit(PendingVideo("waiting", None, 0))
    assert queue.close("stopping") == 1
    assert isinstance(waiting.future.exception(), Unavailable)
    assert isinstance(gone.future.exception(), Unavailable)
    assert queue.take(1) is Closed
    with pytest.raises(Unavailable):
        queue.submit(PendingVideo("late", None, 0))


def test_running_counts_taken_requests_until_answered():
    """`running` (the wan_spmd_jobs_running gauge) counts what the loop took and has not answered:
    if this fails, an operator cannot tell an idle server from a busy one with an empty queue."""
    queue = JobQueue(max_size=2)
    first, second = queue.submit(PendingVideo("a", None, 0)), queue.submit(PendingVideo("b", None, 0))
    assert (queue.depth, queue.running) == (2, 0)
    queue.take(0)
    queue.take(0)
    assert (queue.depth, queue.running) == (0, 2)
    first.resolve(error=Unavailable("done"))
    second.resolve(error=Unavailable("done"))
    assert queue.running == 0


@pytest.mark.parametrize(
    "server, host, origin, refused",
    [
        (("127.0.0.1", 8000), b"127.0.0.1:8000", None, None),
        (("127.0.0.1", 8000), b"localhost:8000", b"http://localhost:8000", None),
        (("::1", 8000), b"[::1]:8000", None, None),
        (("::ffff:10.0.0.5", 80), b"10.0.0.5", None, None),  # a dual-stack socket, the default port
        (("10.0.0.5", 8000), b"localhost:8000", None, "Host"),  # localhost is not this address
        (("127.0.0.1", 8000), b"evil.example:8000", None, "Host"),  # DNS rebinding
        (("127.0.0.1", 8000), b"127.0.0.1:8001", None, "Host"),
        (("127.0.0.1", 8000), b"127.0.0.1:8000", b"http://evil.example", "Origin"),
        (("127.0.0.1", 8000), b"127.0.0.1:8000", b"null", "Origin"),
        (("/run/wan.sock", None), b"anything", None, None),  # a Unix socket: no browser reaches it
        (("/run/wan.sock", None), b"anything", b"http://evil.example", "Origin"),
    ],
)
def test_without_key_only_own_host_and_origin_come_in(ctx, server, host, origin, refused):
    """Without --api-key the Host must name the address the client reached and an Origin must be
    that address too; a Unix socket has no Host to check. If this fails, web pages can drive a
    keyless server (cross-site forms, DNS rebinding), or its own clients are refused."""
    from wan_spmd.server.app import Front

    headers = [(b"host", host)] + ([(b"origin", origin)] if origin else [])
    error = Front(None, ctx).refusal({"type": "http", "path": "/v1/videos", "headers": headers, "server": server})
    assert (error.param if error else None) == refused
    assert error is None or error.status == 403


def test_ti2v_server_names_its_family_and_takes_a_prompt_alone():
    """A TI2V-5B server lists its family in /v1/models (its folder's pipeline class, `WanPipeline`,
    is T2V-A14B's too), admits a request with no image (text-to-video) and refuses 1280x720 (not a
    multiple of 32) with a 400 naming `size` when strict, else rounds it down to 1280x704 and says so."""
    from wan_spmd.config import REAL_MODELS

    info = REAL_MODELS["wan2.2-ti2v-5b"]
    settings = ServerSettings(info=info, defaults=generation_defaults(info), served_model_name="ti2v", limits=Limits())
    ctx = ServerContext(settings, JobQueue(max_size=1))
    ctx.mark_ready()
    mp4 = b"\x00\x00\x00\x18ftypisom fake mp4"
    loop = FakeLoop(ctx.queue, lambda p: p.resolve(VideoAnswer(mp4=mp4, path="/x.mp4", timings_ms=dict(PIPELINE_MS))))
    with TestClient(create_app(ctx)) as client:
        (card,) = client.get("/v1/models").json()["data"]
        assert (card["id"], card["family"], card["pipeline"]) == ("ti2v", "wan2.2-ti2v-5b", "WanPipeline")
        r = client.post("/v1/videos/sync", data={**FORM, "size": "1280x720", "strict": "true"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "size", r.text
        assert "multiple of 32" in r.json()["error"]["message"]
        r = client.post("/v1/videos/sync", data={**FORM, "size": "1280x720", "num_frames": "8"})
        assert r.status_code == 200 and r.headers["x-adjusted"] == "size=1280x720->1280x704, num_frames=8->9", r.text
        r = client.post("/v1/videos/sync", data={**FORM, "size": "64x32"})
        assert r.status_code == 200 and r.content == mp4, r.text
    ctx.queue.close("test over")
    rounded, job = loop.seen
    assert (rounded.params.size, rounded.params.num_frames) == ("1280x704", 9)
    assert job.params.image is None and (job.params.width, job.params.height) == (64, 32)
    assert job.params.num_inference_steps == 2 and job.params.fps == 24  # the request's, then the preset's


@pytest.mark.parametrize("limit", ["５", "1_0", " 7", "+5", "-1", "1e1", "9" * 5000])
def test_limit_takes_ascii_digits_only(ctx, client, limit):
    """`limit` is ASCII digits or a 400 naming it: if this fails, `int()` quietly takes a fullwidth
    digit or `1_0`, or spends its time on 5000 digits."""
    r = client.get("/v1/videos", params={"limit": limit})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit", r.text
    assert len(r.json()["error"]["message"]) < 200


def test_errors_quote_a_short_prefix_of_what_was_sent(ctx, client):
    """A 60 KB id, `order` or `variant` is quoted in its error by its first characters only: if this
    fails, every error echoes whatever a client sends, as large as it sends it. (An unknown `after`
    is an empty page, as vllm-omni answers, so it has no error to quote.)"""
    long = "v" * 60_000
    for path, params, status in (
        (f"/v1/videos/{long}", None, 404),
        (f"/v1/videos/{long}/content", None, 404),
        (f"/v1/videos/{long}/content", {"variant": long}, 400),
        ("/v1/videos", {"order": long}, 400),
    ):
        r = client.get(path, params=params)
        message = r.json()["error"]["message"]
        assert r.status_code == status and len(message) < 200 and "60000 characters" in message, message
    assert client.get("/v1/videos", params={"limit": "0005"}).status_code == 200
    page = client.get("/v1/videos", params={"after": long})
    assert page.status_code == 200 and page.json()["data"] == [], page.text


def _download(client, video_id: str, start: threading.Barrier, got: list) -> None:
    start.wait()
    try:
        got.append(client.get(f"/v1/videos/{video_id}/content"))
    except Exception as exc:  # a connection cut mid-answer
        got.append(exc)


def test_content_racing_delete_is_whole_or_404(ctx, tmp_path):
    """GET .../content and DELETE of the same job, a hundred times at once over a real socket: each
    download is a 200 with every byte or a 404, never a 500 or an answer cut short. If this fails, a
    client that downloads while another deletes gets a FileNotFoundError 500 or a truncated mp4 that
    looks whole to nobody (issue 33: 5 of 226 were 500, 17 cut)."""
    import os
    import secrets

    import httpx

    from wan_spmd.server.http import HttpThread
    from wan_spmd.server.videos import VideoRecord, VideoStore

    ctx.videos = VideoStore(tmp_path, "r1")
    data = secrets.token_bytes(1 << 20)
    http = HttpThread(create_app(ctx), "127.0.0.1", 0, None)
    url = http.start()
    outcomes: dict[str, int] = {}
    try:
        with httpx.Client(base_url=url, timeout=30) as getter, httpx.Client(base_url=url, timeout=30) as deleter:
            for i in range(100):
                video_id = f"video_r1_{i:024x}"
                (tmp_path / f"{video_id}.mp4").write_bytes(data)
                record = VideoRecord(
                    video_id, "completed", 0, "tiny", "64x48", "1", "x", 5, 16, 0, video=f"{video_id}.mp4"
                )
                ctx.videos.add(record)
                start = threading.Barrier(2)
                got: list[httpx.Response | Exception] = []
                thread = threading.Thread(target=_download, args=(getter, video_id, start, got))
                thread.start()
                start.wait()
                os.sched_yield()
                assert deleter.delete(f"/v1/videos/{video_id}").status_code in (200, 404)
                thread.join()
                (r,) = got
                if isinstance(r, Exception):
                    outcome = type(r).__name__
                elif r.status_code == 200 and r.content != data:
                    outcome = f"cut at {len(r.content)}"
                else:
                    outcome = "whole" if r.status_code == 200 else str(r.status_code)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        http.stop()
    print(outcomes)
    assert set(outcomes) <= {"whole", "404"}, outcomes
