"""The `serve` front's glue between the HTTP app and the SPMD loop.

Rank 0 starts the HTTP server first (so /health can say 503 while the model loads), then every
rank loads its shard; one control-plane agreement tells rank 0 that all ranks have loaded, and only
then is /health 200. From there rank 0's main thread runs the SPMD loop fed by `QueueJobSource`:
requests come off the bounded queue, every rank runs them, and rank 0 encodes the frames to an mp4
under --output-dir (in an encoder thread, so the next job can start meanwhile) and resolves the
request's future. Other ranks only run the loop.

Staying up and going down (issue 6): idle ranks wait on the control plane, whose heartbeats are
agreements every rank joins, so a dead or stuck rank is noticed within --heartbeat-timeout. A
`ShutdownWatch` on every rank reacts to SIGTERM/SIGINT at once, even while the main thread sits in
a collective: rank 0 stops admitting, answers the queue 503 and cancels the running job at its next
step; a stop every rank agreed to exits 0, a lost rank exits 1 (so torchrun --max-restarts or a
supervisor restarts the job), and a main thread still stuck after --stop-grace is ended by the watch
after the last answers are sent.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from wan_spmd.runtime import ControlPlane, ControlPlaneLost, Dist, Job, Outcome, ShutdownWatch, StopLoop
from wan_spmd.server.queue import Closed, JobFailed, JobQueue, PendingVideo, Unavailable, VideoAnswer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from wan_spmd.server.app import ServerSettings

log = logging.getLogger("wan_spmd")

LOST = "the server lost one of its ranks (dead or stuck) and is stopping so that it can be restarted; retry shortly"


class QueueJobSource:
    """The server's JobSource on rank 0: jobs from the HTTP queue, outcomes to their futures."""

    def __init__(self, queue: JobQueue, output_dir: Path) -> None:
        self.queue = queue
        self.output_dir = output_dir
        self.stop_reason: str | None = None
        """Set (from a signal handler too) to stop: the running job is cancelled, the queue closed."""
        # One encoder thread: mp4 encoding of job k overlaps the denoising of job k+1.
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mp4")
        self._running: dict[str, PendingVideo] = {}
        """Jobs handed to the loop and not yet finished, by id."""

    def request_stop(self, reason: str) -> None:
        """Stop admitting and answer the queue at once (from the shutdown watch's thread); the loop
        then cancels the running job at its next step and broadcasts stop."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.queue.close(reason)

    def next_job(self, timeout: float) -> Job | None | type[StopLoop]:
        if self.stop_reason is not None:
            self.queue.close(self.stop_reason)
        item = self.queue.take(timeout)
        if item is Closed:
            return StopLoop
        if item is None:
            return None
        # The Job is broadcast (pickled) to every rank; its future stays here, on rank 0.
        self._running[item.id] = item
        return Job(item.id, item.params)

    def is_cancelled(self, job: Job) -> bool:
        return self.stop_reason is not None or self._running[job.id].cancelled

    def on_step(self, job: Job, step: int, total: int) -> None:
        pass

    def finish(self, outcome: Outcome) -> None:
        pending = self._running[outcome.job.id]
        if outcome.ok:
            dispatch_ms = (time.perf_counter() - pending.started_at) * 1000.0
            self.encoder.submit(self._deliver, pending, outcome, dispatch_ms)
            return
        del self._running[outcome.job.id]
        if outcome.cancelled:
            reason = self.stop_reason or "the client went away"
            log.info("video %s %s: %s", pending.id, outcome.error, reason)
            pending.resolve(error=Unavailable(reason))
        else:
            pending.resolve(error=JobFailed(outcome.error or "unknown error"))

    def _deliver(self, pending: PendingVideo, outcome: Outcome, dispatch_ms: float) -> None:
        """Encoder thread: frames -> mp4 under --output-dir -> the request's future."""
        from wan_spmd.video import write_mp4

        try:
            start = time.perf_counter()
            params = pending.params
            stamp = datetime.fromtimestamp(pending.created).strftime("%Y%m%d-%H%M%S")
            path = write_mp4(outcome.result.frames.numpy(), self.output_dir / f"{stamp}_{pending.id}.mp4", params.fps)
            mp4 = path.read_bytes()
            timings = dict(outcome.result.timings_ms)
            timings["Queue"] = (pending.started_at - pending.enqueued_at) * 1000.0
            # broadcast, per-step agreements, frames to host: the loop's time outside PipelineWall
            timings["Dispatch"] = dispatch_ms - timings.get("PipelineWall", 0.0)
            timings["Mp4Encoding"] = (time.perf_counter() - start) * 1000.0
            pending.resolve(VideoAnswer(mp4=mp4, path=str(path), timings_ms=timings))
        except Exception as exc:  # a reply is always sent
            log.exception("could not encode video %s", pending.id)
            pending.resolve(error=JobFailed(f"encoding the mp4 failed: {type(exc).__name__}: {exc}"))
        finally:
            self._running.pop(pending.id, None)

    def close(self, reason: str) -> None:
        """Let the encoder finish the videos it holds, then answer whatever is still waiting or
        running (the loop may have ended mid-job)."""
        self.queue.close(reason)
        self.encoder.shutdown(wait=True)
        self.abandon(reason)

    def abandon(self, reason: str) -> None:
        """Answer everything waiting, running or encoding with 503 now, without waiting for the loop
        or the encoder (the shutdown watch calls this when the main thread is stuck)."""
        self.queue.close(reason)
        for pending in list(self._running.values()):
            pending.resolve(error=Unavailable(reason))
        self._running.clear()


class HttpThread:
    """uvicorn in a daemon thread of rank 0 (uvicorn leaves signals to the main thread there)."""

    def __init__(self, app: FastAPI, host: str, port: int, uds: str | None) -> None:
        import uvicorn

        config = uvicorn.Config(
            app, host=host, port=port, uds=uds, log_level="warning", access_log=False, timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.uds = uds
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # uvicorn exits through SystemExit when it cannot bind
            self.error = exc

    def start(self, timeout: float = 30.0) -> str:
        """Start serving; the address it listens on, or ValueError saying why it could not."""
        if self.uds and os.path.lexists(self.uds):
            if not stat.S_ISSOCK(os.lstat(self.uds).st_mode):
                raise ValueError(f"--uds {self.uds} exists and is not a socket; refusing to replace it")
            os.unlink(self.uds)  # a stale socket from an earlier run would make bind fail
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                where = self.uds or f"{self.server.config.host}:{self.server.config.port}"
                raise ValueError(f"the HTTP server could not listen on {where} (in use? see the log above)")
            time.sleep(0.02)
        if self.uds:
            return f"unix:{self.uds}"
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.remove_socket()

    def remove_socket(self) -> None:
        """Remove the socket we bound (never a file that was there when we could not bind)."""
        if self.uds and self.server.started and os.path.lexists(self.uds):
            if stat.S_ISSOCK(os.lstat(self.uds).st_mode):
                os.unlink(self.uds)


@dataclass(frozen=True)
class ServeOptions:
    """The serve command's transport options (the request limits live in ServerSettings)."""

    host: str = "127.0.0.1"
    port: int = 8000
    uds: str | None = None
    max_queue: int = 16
    output_dir: Path = Path("outputs")
    device: str = "auto"
    load_format: str = "auto"
    """auto reads the folder's weights; dummy makes random ones (benchmarks without weights)."""
    collective_timeout_s: float = 600.0
    """Bound on the default group's collectives (inside a job; idle ranks never wait there)."""
    heartbeat_timeout_s: float = 60.0
    """Bound on every control-plane call: a dead or stuck rank is noticed within it."""
    stop_grace_s: float = 15.0
    """After SIGTERM/SIGINT, how long the loop may take to stop before the process ends itself."""
    load_timeout_s: float = 1800.0
    """How long ranks wait for each other to finish loading."""

    @property
    def heartbeat_s(self) -> float:
        """Idle heartbeat period, well inside the timeout that bounds the other ranks' wait."""
        return min(5.0, self.heartbeat_timeout_s / 4)


def agree_all_ok(d: Dist, ok: bool) -> bool:
    """One control-plane all-reduce after start-up: it returns only once every rank got here, and
    says whether every rank is ready (loaded, and on rank 0 listening)."""
    failed, _ = ControlPlane(d).any_flags(not ok, False)
    return not failed


def run_server(settings: ServerSettings, options: ServeOptions) -> int:
    """Every rank: join, load, agree, then loop; rank 0 also serves HTTP. Returns the exit status:
    0 after a stop every rank agreed to, 1 when a rank was lost or could not start."""
    from wan_spmd.runtime import init_dist

    d = init_dist(options.device, options.collective_timeout_s, options.heartbeat_timeout_s)
    rank = RankServer(d, settings, options)
    with ShutdownWatch(rank.on_signal, rank.on_expire, grace_s=options.stop_grace_s) as watch:
        code = rank.run(watch)
    rank.log_exit(code)
    return code


class RankServer:
    """One rank's part of the server; rank 0 also holds the HTTP thread, the queue and its source."""

    def __init__(self, d: Dist, settings: ServerSettings, options: ServeOptions) -> None:
        from wan_spmd.server.app import ServerContext, create_app

        self.d = d
        self.settings = settings
        self.options = options
        self.ctx: ServerContext | None = None
        self.http: HttpThread | None = None
        self.source: QueueJobSource | None = None
        if d.is_main:
            self.ctx = ServerContext(settings, JobQueue(options.max_queue))
            self.source = QueueJobSource(self.ctx.queue, options.output_dir)
            self.http = HttpThread(create_app(self.ctx), options.host, options.port, options.uds)

    def run(self, watch: ShutdownWatch) -> int:
        from wan_spmd.runtime import load_pipeline, pipeline_runner, spmd_loop, wait_for_all

        d, ok, lost = self.d, True, False
        try:
            # 1. Rank 0 listens at once, so /health answers 503 while the model loads
            if self.http is not None:
                try:
                    address = self.http.start()
                    log.info("listening on %s (503 on /health until %d rank(s) have loaded)", address, d.world_size)
                except ValueError as exc:
                    log.error("%s", exc)
                    ok = False
            # 2. Every rank loads its shard, starting together: loading may hold default-group
            #    collectives, and rank 0 has just spent a moment starting HTTP
            wait_for_all(d, self.options.load_timeout_s)
            pipe = None
            if ok:
                try:
                    pipe = load_pipeline(d, self.settings.info, load_format=self.options.load_format)
                except Exception:
                    log.exception("rank %d could not load the model", d.rank)
                    ok = False
            # 3. Wait for every rank however long loading takes, agree that all loaded, then serve
            wait_for_all(d, self.options.load_timeout_s)
            if not agree_all_ok(d, ok):
                if d.is_main:
                    log.error("not every rank is ready; stopping")
                    self.ctx.mark_stopping("failed")
                return 1
            if self.ctx is not None:
                self.ctx.mark_ready()
                log.info(
                    "ready: %s on %d rank(s), writing videos to %s",
                    self.settings.served_model_name,
                    d.world_size,
                    self.options.output_dir,
                )
            jobs = spmd_loop(d, pipeline_runner(pipe, d.is_main), self.source, self.options.heartbeat_s)
            stop = self.source.stop_reason if self.source else None
            log.info("stopped after %d job(s)%s", jobs, f": {stop}" if stop else "")
            return 0
        except ControlPlaneLost as exc:
            lost = True
            watch.expire_in()  # the teardown may wait on the lost peer too: bound it
            log.error("%s; exiting with status 1 for torchrun --max-restarts or a supervisor to restart", exc)
            return 1
        finally:
            self.teardown(lost)

    def teardown(self, lost: bool) -> None:
        """Answer everything still waiting, stop HTTP (removing the socket), leave the process group
        (not after a lost peer: destroying the group could wait on it)."""
        from wan_spmd.runtime import shutdown

        if self.ctx is not None:
            self.ctx.mark_stopping("failed" if lost else "stopping")
        if self.source is not None:
            self.source.close(LOST if lost else self.source.stop_reason or "the server is shutting down")
        if self.http is not None:
            self.http.stop()
        if not lost:
            shutdown(self.d)

    def on_signal(self, name: str) -> None:
        """The shutdown watch's thread, as soon as SIGTERM/SIGINT arrives."""
        if self.source is None:
            log.warning("%s: waiting for rank 0 to stop the loop", name)
            return
        log.info("%s: answering queued requests 503 and stopping at the next step", name)
        self.ctx.mark_stopping()
        self.source.request_stop(f"the server is shutting down ({name})")

    def on_expire(self, signal_name: str | None) -> None:
        """The shutdown watch's thread, when the main thread has not stopped within --stop-grace of
        a signal (or of a lost peer, None): it is stuck in a collective. Send the last answers; the
        watch then ends the process."""
        log.error(
            "rank %d: still not stopped %.0f s after %s (stuck in a collective with a lost rank?)",
            self.d.rank,
            self.options.stop_grace_s,
            signal_name or "losing a peer",
        )
        if self.source is not None:
            self.ctx.mark_stopping("failed")
            self.source.abandon(self.source.stop_reason if signal_name and self.source.stop_reason else LOST)
            time.sleep(0.5)  # let the HTTP thread write those answers before the process ends
            self.http.remove_socket()
        self.log_exit(1)

    def log_exit(self, code: int) -> None:
        """One line per rank with its exit status (torchrun does not report it when it was signalled)."""
        if code:
            log.error("rank %d exits with status %d", self.d.rank, code)
        elif self.d.is_main:
            log.info("rank %d exits with status 0", self.d.rank)
        else:
            log.warning("rank %d exits with status 0", self.d.rank)
