"""Issue 6, a server that stays up, under real `torchrun --nproc-per-node 2` (gloo, tiny model):
idle past its collective timeout, overload (429), a client that hangs up, SIGINT to torchrun, a
rank killed mid-job or while idle, a rank stuck (SIGSTOP), and the shutdown watch itself.

Two servers, each reused by the tests below it in file order; the tiny model takes about 0.3 s a
denoising step on two CPU cores whatever the size, so a job's length is set by its step count."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLE_IMAGE, ROOT, cli_env
from tests.e2e.test_serve import START_TIMEOUT_S, Server, _metric, _start, _stop, alive, rank_pids, wait_healthy

LOST = "lost one of its ranks"
STOPPING = "the server is shutting down"


def _start_steady(tmp: Path) -> Server:
    """A collective timeout (4 s) shorter than the idle heartbeat period (18/4 = 4.5 s): any idle wait
    in a default-group collective would outlast it and fail. (It also bounds the ranks' start-up
    rendezvous, so it is not smaller: two ranks importing torch on busy cores start seconds apart.)"""
    flags = ("--collective-timeout", "4", "--heartbeat-timeout", "18", "--stop-grace", "10", "--max-queue", "2")
    return _start(tmp, *flags, uds=tmp / "wan.sock")


@pytest.fixture(scope="module")
def steady(servers, tiny_i2v) -> Server:
    return servers.get("steady", _start_steady)


@pytest.fixture
def steady_loads_meanwhile(servers, tiny_i2v) -> None:
    """Start the steady server loading in the background: the test that asks for this runs just
    before the steady server's tests (the last in this file), so by then it has been idle for a
    while, which the first of them would otherwise wait out."""
    servers.start_soon("steady", _start_steady)


@pytest.fixture(scope="module")
def restartable(tmp_path_factory, tiny_i2v) -> Iterator[Server]:
    """Under `torchrun --max-restarts 2`, as a deployment should run it."""
    tmp = tmp_path_factory.mktemp("restartable")
    flags = ("--collective-timeout", "5", "--heartbeat-timeout", "5", "--stop-grace", "10")
    server = _start(tmp, *flags, uds=tmp / "wan.sock", torchrun=("--max-restarts", "2"))
    yield server
    server.client.close()
    _stop(server.proc)


def _form(steps: int, **extra: str) -> dict[str, str]:
    return {"prompt": "a cat", "size": "32x32", "num_frames": "5", "num_inference_steps": str(steps), **extra}


def _files() -> dict:
    return {"input_reference": ("in.png", EXAMPLE_IMAGE.read_bytes(), "image/png")}


class Call(threading.Thread):
    """One request in a thread of its own, its answer kept (or the transport error)."""

    def __init__(self, server: Server, steps: int) -> None:
        super().__init__(daemon=True)
        self.server, self.steps = server, steps
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = self.server.client.post("/v1/videos/sync", data=_form(self.steps), files=_files())
        except Exception as exc:
            self.error = exc

    def answer(self, timeout: float = 60) -> httpx.Response:
        self.join(timeout)
        assert self.response is not None, f"no answer: {self.error!r}"
        return self.response


def _wait_for(predicate, timeout: float, what: str, server: Server) -> float:
    """Poll until `predicate()`; how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s:\n{server.log_text()}")
        time.sleep(0.05)
    return time.monotonic() - start


def _running(server: Server) -> bool:
    """The loop has taken a request and not answered it yet."""
    return _metric(server.client, "wan_spmd_jobs_running") == 1


def _assert_503(r: httpx.Response, *reasons: str) -> None:
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after"), r.headers
    message = r.json()["error"]["message"]
    assert any(reason in message for reason in reasons), message


# -- a server under torchrun --max-restarts 2 ---------------------------------------------------


def _restarted(server: Server, old: dict[int, int]) -> None:
    """torchrun has brought up new workers and they serve again (same socket)."""
    wait_healthy(server, time.monotonic() + START_TIMEOUT_S)
    assert set(server.ranks().values()).isdisjoint(old.values())
    r = server.client.post("/v1/videos/sync", data=_form(2), files=_files())
    assert r.status_code == 200, r.text


def test_rank_killed_mid_job_answers_503_and_restarts(restartable):
    """kill -9 of rank 1 during a job, with another request queued: both clients get 503 at once
    (a lost rank, or the shutdown torchrun starts), rank 0 exits with status 1, and torchrun
    --max-restarts brings the server back on the same socket. If this fails, a dead GPU process
    hangs its clients, or the job exits 0 and no supervisor restarts it."""
    workers = restartable.ranks()
    running = Call(restartable, steps=40)
    _wait_for(lambda: _running(restartable), 10, "the job starting", restartable)
    queued = Call(restartable, steps=2)
    _wait_for(lambda: _metric(restartable.client, "wan_spmd_queue_depth") == 1, 10, "a request queued", restartable)
    start = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    _assert_503(running.answer(), LOST, STOPPING)
    _assert_503(queued.answer(), LOST, STOPPING)
    assert time.monotonic() - start < 5
    _wait_for(lambda: "rank 0 exits with status 1" in restartable.log_text(), 15, "rank 0 exiting", restartable)
    _restarted(restartable, workers)


def test_stuck_rank_is_noticed_by_the_heartbeat(restartable):
    """SIGSTOP of rank 1 while idle (stuck, not dead: torchrun sees nothing): rank 0's heartbeat
    agreement fails within --heartbeat-timeout 5, the request that waited meanwhile gets 503
    naming a lost rank, rank 0 exits 1 and torchrun restarts the job. If this fails, one hung rank
    silently freezes the whole server."""
    workers = restartable.ranks()
    os.kill(workers[1], signal.SIGSTOP)
    try:
        time.sleep(1.5)  # past one heartbeat period (5/4 s): rank 0 now waits on rank 1
        start = time.monotonic()
        _assert_503(Call(restartable, steps=2).answer(), LOST)
        assert time.monotonic() - start < 8
    finally:
        os.kill(workers[1], signal.SIGCONT)  # it then meets torchrun's SIGTERM and a closed peer
    assert re.search(r"failed during the heartbeat (broadcast|agreement)", restartable.log_text())
    _restarted(restartable, workers)


def test_rank_killed_while_idle_exits_nonzero(restartable):
    """kill -9 of rank 1 while idle, with no restarts left: rank 0 notices at once, exits with
    status 1, torchrun exits non-zero naming the dead rank, nothing is left running and the socket
    is gone. If this fails, a half-dead server keeps accepting requests it can never run."""
    workers = restartable.ranks()
    start = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    assert restartable.proc.wait(timeout=30) != 0
    assert time.monotonic() - start < 15
    log = restartable.log_text()
    assert log.count("rank 0 exits with status 1") == 3, log
    assert re.search(r"exitcode\s*:\s*-9", log), log  # torchrun's failure report for rank 1
    assert not [pid for pid in workers.values() if alive(pid)]
    assert not restartable.uds.exists()


# -- the shutdown watch on its own ----------------------------------------------------------------

WATCH_SCRIPT = """
import sys, time
import torch
import torch.distributed as dist
from wan_spmd.runtime import ShutdownWatch, init_dist, wait_for_all

d = init_dist("cpu", collective_timeout_s=120, control_timeout_s=2)
if d.rank == 1:
    time.sleep(5)  # a slow loader, past the 2 s control timeout
wait_for_all(d, timeout_s=60)
print(f"rank {d.rank} all arrived", flush=True)
if d.rank == 1:
    time.sleep(120)  # stuck: never joins rank 0's collective
say = lambda what: print(f"{what} at {time.monotonic():.3f}", flush=True)
with ShutdownWatch(lambda name: say(f"on_signal {name}"), lambda name: say("on_expire"), grace_s=2, exit_code=3):
    say("blocking")
    dist.all_reduce(torch.zeros(1))  # the main thread never returns to Python from here
"""


def test_shutdown_watch_acts_while_the_main_thread_is_blocked(tmp_path):
    """Rank 0's main thread sits in a gloo all-reduce that rank 1 never joins; SIGTERM to rank 0
    reaches the watch at once, and after the 2 s grace the watch ends the process with its status.
    Also, the start-up wait outlasts the control timeout (2 s) while a rank loads for 5 s. If this
    fails, a rank stuck in a collective ignores SIGTERM until torchrun's SIGKILL (no answers sent),
    or slow loading kills the server at start-up."""
    script = tmp_path / "watch.py"
    script.write_text(WATCH_SCRIPT)
    out = tmp_path / "out.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, env=cli_env(), cwd=ROOT, start_new_session=True
        )
    workers: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 60
        while "blocking at" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        assert "rank 0 all arrived" in out.read_text() and "rank 1 all arrived" in out.read_text()
        workers = rank_pids(proc.pid)
        time.sleep(0.5)  # well inside the all-reduce
        signalled = time.monotonic()
        os.kill(workers[0], signal.SIGTERM)
        proc.wait(timeout=30)
        log = out.read_text()
        on_signal = float(re.search(r"on_signal SIGTERM at ([\d.]+)", log).group(1))
        on_expire = float(re.search(r"on_expire at ([\d.]+)", log).group(1))
        assert on_signal - signalled < 1.0, log
        assert 1.9 < on_expire - on_signal < 4.0, log
        assert re.search(r"exitcode\s*:\s*3", log), log  # torchrun's report of rank 0's own status
    finally:
        _stop(proc)
        for pid in workers.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- a signal to the whole process group in the middle of a video --------------------------------


def test_stops_land_within_a_vae_chunk_encode_then_decode(tmp_path, tiny_i2v, steady_loads_meanwhile):
    """Issue 33.3/33.4, on one server. First a DELETE while the 2-rank row-split VAE encodes a
    121-frame I2V condition (31 chunks, seconds of work): the job stops after the chunk in hand, on
    every rank alike, and the server takes the next job. Then Ctrl-C (SIGINT to the whole process
    group: torchrun, both ranks) while the VAE decodes a long video and rank 0 streams it into
    `.part`. Every rank stops after the chunk in hand (agreed as the steps are), the partial file is
    removed, the job is recorded cancelled (not generation_failed VideoWriteError), and every rank
    exits 0 well inside --stop-grace. A `.part` left by an earlier run is removed at start-up. If this
    fails, a stop waits for the whole encode or decode (or past --stop-grace: exit 1), or
    half-written videos stay in --output-dir."""
    out = tmp_path / "videos"
    out.mkdir()
    stale = out / f".20261207-010203_video_t1_{'a' * 24}-{'0' * 12}.mp4.part"
    stale.write_bytes(b"\x00" * 100)
    server = _start(tmp_path, "--replica-name", "t1", "--stop-grace", "30", uds=tmp_path / "wan.sock")
    try:
        assert not stale.exists()
        # the encode: stopped by a DELETE as soon as the job runs (its text encoding takes milliseconds)
        form = {"prompt": "a dog", "size": "192x192", "num_frames": "121", "num_inference_steps": "1"}
        r = server.client.post("/v1/videos", data=form, files=_files())
        assert r.status_code == 200, r.text
        encoding = r.json()["id"]
        running = lambda: server.client.get(f"/v1/videos/{encoding}").json()["status"] == "in_progress"  # noqa: E731
        _wait_for(running, 60, "the encode starting", server)
        assert server.client.delete(f"/v1/videos/{encoding}").status_code == 200
        pattern = r"stopped while encoding the image, after chunk (\d+) of (\d+)"
        _wait_for(lambda: re.search(pattern, server.log_text()), 60, "the encode stopping", server)
        done, total = map(int, re.search(pattern, server.log_text()).groups())
        assert total == 31 and done < total, server.log_text()
        # the decode (the next job: both ranks left the encode at the same chunk, or its collectives
        # would not meet)
        form = {"prompt": "a cat", "size": "192x192", "num_frames": "81", "num_inference_steps": "1"}
        r = server.client.post("/v1/videos", data=form, files=_files(), headers={"Prefer": "respond-async"})
        assert r.status_code == 200, r.text
        video_id = r.json()["id"]
        _wait_for(lambda: list(out.glob(f".*{video_id}-*.mp4.part")), 60, "the decode starting", server)
        os.killpg(server.proc.pid, signal.SIGINT)  # the group: torchrun and both ranks at once
        server.proc.wait(timeout=60)
    finally:
        server.client.close()
        _stop(server.proc)
    log = server.log_text()
    assert "rank 0 exits with status 0" in log and "rank 1 exits with status 0" in log, log
    found = re.search(r"stopped while decoding, after chunk (\d+) of (\d+)", log)
    assert found and int(found.group(1)) < int(found.group(2)), log
    assert not list(out.glob("*.mp4")) and not list(out.glob(".*.part")), sorted(p.name for p in out.iterdir())
    record = json.loads((out / "jobs" / f"{video_id}.json").read_text())
    assert record["status"] == "failed" and record["error"]["code"] == "cancelled", record
    assert "VideoWriteError" not in log, log
    assert f"SIGINT: stopping job {video_id} at its next step or decoded chunk" in log, log


# -- a steady server --------------------------------------------------------------------------


def test_idle_past_the_collective_timeout(steady, servers):
    """Idle 19 s or more since it became healthy (it starts loading during the test above, so part
    of that has passed; the rest is waited), over four times --collective-timeout
    4 (and past one --heartbeat-timeout 18), then a request succeeds: if this fails, idle ranks wait
    inside a default-group collective (which times out) rather than on the control plane between
    heartbeats, and a server dies of a quiet night."""
    assert _metric(steady.client, "wan_spmd_stage_seconds_count", stage="PipelineWall") == 0  # no job yet
    time.sleep(max(0.0, servers.idle_since("steady") + 19 - time.monotonic()))
    r = steady.client.post("/v1/videos/sync", data=_form(2), files=_files())
    assert r.status_code == 200, r.text
    assert "ERROR" not in steady.log_text()


def test_overload_gets_429_and_the_admitted_finish(steady):
    """With one job running and --max-queue 2, five more requests at once: two are admitted and
    three get 429 with Retry-After, and every admitted one finishes with a video. If this fails,
    overload blocks clients, drops admitted work, or lets the queue grow without bound."""
    queue_full = _metric(steady.client, "wan_spmd_requests_total", endpoint="/v1/videos/sync", outcome="queue_full")
    first = Call(steady, steps=10)  # about 3 s
    _wait_for(lambda: _running(steady), 10, "the first job starting", steady)
    burst = [Call(steady, steps=2) for _ in range(5)]
    answers = [call.answer() for call in burst]
    refused = [r for r in answers if r.status_code == 429]
    assert len(refused) == 3, [r.status_code for r in answers]
    for r in refused:
        assert r.headers["retry-after"] == "5" and r.json()["error"]["type"] == "rate_limit_error"
    for r in [first.answer(), *(r for r in answers if r.status_code != 429)]:
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text
    after = _metric(steady.client, "wan_spmd_requests_total", endpoint="/v1/videos/sync", outcome="queue_full")
    assert after == queue_full + 3


def _post_and_hang_up(server: Server, steps: int, after_s: float) -> None:
    """A raw HTTP client that sends a whole request, then closes its socket without reading."""
    request = httpx.Request("POST", "http://serve/v1/videos/sync", data=_form(steps), files=_files())
    head = "POST /v1/videos/sync HTTP/1.1\r\nHost: serve\r\n"  # a synchronous request: its client waits
    head += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(server.uds))
        sock.sendall(head.encode() + b"\r\n" + request.read())
        time.sleep(after_s)


def test_client_that_hangs_up_cancels_its_job(steady):
    """A client that closes its connection 1.5 s into a 40-step job (about 12 s): the job stops at
    its next step (the log names one before the 40th), no video is kept, /metrics counts it as
    disconnected, and the next request succeeds. If this fails, abandoned requests keep the GPUs
    busy (or break the loop)."""
    c = steady.client
    gone = _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos/sync", outcome="disconnected")
    videos = set(steady.output_dir.glob("*.mp4"))
    _post_and_hang_up(steady, steps=40, after_s=1.5)
    r = c.post("/v1/videos/sync", data=_form(2), files=_files())  # waits behind the cancelled job
    assert r.status_code == 200, r.text
    found = re.search(r"cancelled at step (\d+) of 40: the client went away", steady.log_text())
    assert found and 0 < int(found.group(1)) < 40, steady.log_text()
    assert _metric(c, "wan_spmd_requests_total", endpoint="/v1/videos/sync", outcome="disconnected") == gone + 1
    assert len(set(steady.output_dir.glob("*.mp4")) - videos) == 1  # only the later request's


def test_sigint_to_torchrun_stops_every_rank(steady):
    """SIGINT to torchrun alone (Ctrl-C, or `docker stop` with STOPSIGNAL SIGINT) with one job
    running and one queued: both clients get 503 saying the server is shutting down, every rank
    exits with status 0 within 30 s, no worker outlives torchrun, the socket file is gone. If this
    fails, a restart or redeploy loses answers, leaves orphans, or cannot bind its socket."""
    workers = steady.ranks()
    running = Call(steady, steps=40)
    _wait_for(lambda: _running(steady), 10, "the job starting", steady)
    queued = Call(steady, steps=2)
    _wait_for(lambda: _metric(steady.client, "wan_spmd_queue_depth") == 1, 10, "a request queued", steady)
    os.kill(steady.proc.pid, signal.SIGINT)
    _assert_503(queued.answer(), f"{STOPPING} (SIGINT)")
    _assert_503(running.answer(), f"{STOPPING} (SIGINT)")
    steady.proc.wait(timeout=30)
    log = steady.log_text()
    assert "rank 0 exits with status 0" in log and "rank 1 exits with status 0" in log, log
    assert re.search(r"cancelled at step \d+ of 40: the server is shutting down \(SIGINT\)", log), log
    assert "SignalException" in log and "got signal: 2" in log  # what torchrun says on its own
    assert not [pid for pid in workers.values() if alive(pid)]
    assert not steady.uds.exists()
