"""Two replicas on one job store (issue 34): two real `torchrun ... serve` processes (tiny model, one
rank each) with the same --output-dir, as two pods on one ReadWriteMany volume, driven with the
official `openai` SDK as users do: a job made on one is polled, downloaded, listed and deleted on
the other; a DELETE that reaches the other replica stops the running job on its owner; and when the
owner is killed mid-job, the other fails the job with the reason once the owner's lease lapses
(--job-lease 2 here, 60 s by default)."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.test_serve import Server, _metric, _start, _stop
from tests.e2e.test_video_jobs import AUTH, KEY, PNG, _sdk

LEASE_S = 2
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-store")


def _replica(tmp_path_factory, store: Path, name: str) -> Server:
    args = ("--api-key", KEY, "--replica-name", name, "--job-lease", str(LEASE_S))
    return _start(tmp_path_factory.mktemp(name), *args, headers=AUTH, torchrun=("--nproc-per-node=1",), out=store)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, store, tiny_i2v) -> Iterator[tuple[Server, Server]]:
    a = _replica(tmp_path_factory, store, "ra")
    try:
        b = _replica(tmp_path_factory, store, "rb")
    except BaseException:
        _stop(a.proc)
        raise
    yield a, b
    for server in (a, b):
        server.client.close()
        _stop(server.proc)


def _create(sdk: openai.OpenAI, steps: int) -> openai.types.Video:
    return sdk.videos.create(
        prompt="a cat on a boat",
        input_reference=("cat.png", PNG, "image/png"),
        extra_body={"size": "64x48", "num_frames": 5, "num_inference_steps": steps, "seed": 3},
    )


def _until(check, what: str, timeout: float = 120):
    """Poll `check` until it returns something true; fail naming `what` after `timeout` (a bound on
    a hung server, not a timing the test relies on)."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def _status(sdk: openai.OpenAI, video_id: str) -> openai.types.Video | None:
    try:
        return sdk.videos.retrieve(video_id)
    except openai.NotFoundError:
        return None


def test_create_here_poll_download_list_delete_there(replicas, store):
    """Made on A; B shows its progress and completion, serves the same mp4 bytes and a thumbnail,
    lists it, and deletes it, after which neither replica knows it and its files are gone from the
    volume. If this fails, a poll or download that a balancer sends to the other replica gets 404."""
    a, b = replicas
    on_a, on_b = _sdk(a), _sdk(b)
    video = _create(on_a, steps=6)
    assert video.id.startswith("video_ra_")
    done = _until(lambda: (v := on_b.videos.retrieve(video.id)).status in ("completed", "failed") and v, "completion")
    assert (done.status, done.progress, done.size) == ("completed", 100, "64x48"), done
    mp4 = on_b.videos.download_content(video.id).content
    assert mp4[4:8] == b"ftyp" and mp4 == on_a.videos.download_content(video.id).content
    assert on_b.videos.download_content(video.id, variant="thumbnail").content[:2] == b"\xff\xd8"
    assert video.id in [v.id for v in on_b.videos.list(limit=100)]
    assert any(store.glob(f"*{video.id}.mp4"))

    assert on_b.videos.delete(video.id).deleted
    assert _status(on_a, video.id) is None and _status(on_b, video.id) is None
    _until(lambda: not any(store.glob(f"*{video.id}*")) and not any(store.glob(f"jobs/{video.id}*")), "files gone")
    assert _metric(a.client, "wan_spmd_videos", AUTH, status="completed") == 0


def test_delete_on_the_other_replica_stops_the_running_job(replicas, store):
    """A long job running on A, deleted through B: A stops it at its next step (its log says which
    step, well before the last) and is free for the next job. If this fails, a deleted video keeps
    the owner's GPUs busy to the end."""
    a, b = replicas
    on_a, on_b = _sdk(a), _sdk(b)
    video = _create(on_a, steps=200)
    _until(lambda: (v := _status(on_b, video.id)) is not None and v.progress >= 1, "progress seen on B")
    assert on_b.videos.delete(video.id).deleted
    line = _until(lambda: re.search(rf"video {video.id} cancelled at step (\d+) of 200: deleted", a.log_text()), "stop")
    assert int(line.group(1)) < 200
    _until(lambda: _metric(a.client, "wan_spmd_jobs_running", AUTH) == 0, "A free")
    assert not any(store.glob(f"*{video.id}*")) and not any(store.glob(f"jobs/{video.id}*"))


def test_owner_killed_mid_job_is_failed_with_the_reason(replicas, store):
    """SIGKILL to A's process group and rank mid-job: B fails the job (replica_lost, naming A) once
    A's lease has not been renewed for --job-lease seconds (not before: tests/unit/test_shared_store.py),
    while A's finished job stays downloadable. If this fails, a job whose replica died stays in_progress forever."""
    a, b = replicas
    on_a, on_b = _sdk(a), _sdk(b)
    finished = _create(on_a, steps=1)
    _until(lambda: on_b.videos.retrieve(finished.id).status == "completed", "the first job")
    running = _create(on_a, steps=200)
    _until(lambda: on_b.videos.retrieve(running.id).progress >= 1, "progress seen on B")
    _stop(a.proc, signal.SIGKILL)
    failed = _until(lambda: (v := on_b.videos.retrieve(running.id)).status == "failed" and v, "the job failed")
    assert failed.error.code == "replica_lost" and "replica ra stopped renewing its lease" in failed.error.message
    assert on_b.videos.download_content(finished.id).content[4:8] == b"ftyp"
