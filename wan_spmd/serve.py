"""The `serve` front's glue between the HTTP app and the SPMD loop.

Rank 0 starts the HTTP server first (so /health can say 503 while the model loads), then every
rank loads its shard; one control-plane agreement tells rank 0 that all ranks have loaded, and only
then is /health 200. From there rank 0's main thread runs the SPMD loop fed by `QueueJobSource`:
requests come off the bounded queue, every rank runs them, and rank 0 encodes the frames to an mp4
under --output-dir (in an encoder thread, so the next job can start meanwhile) and resolves the
request's future. Other ranks only run the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from wan_spmd.runtime import ControlPlane, Dist, Job, Outcome, StopLoop
from wan_spmd.server.jobs import Closed, JobFailed, JobQueue, PendingVideo, Unavailable, VideoAnswer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from wan_spmd.server.app import ServerSettings

log = logging.getLogger("wan_spmd")


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
        """Safe in a signal handler: set a flag, and close the queue from another thread (taking the
        queue's lock inside a handler could interrupt the main thread while it holds that lock)."""
        if self.stop_reason is None:
            self.stop_reason = reason
            threading.Thread(target=self.queue.close, args=(reason,), name="stop", daemon=True).start()

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
        pending = self._running.pop(outcome.job.id)
        if outcome.cancelled:
            pending.resolve(error=Unavailable(self.stop_reason or "cancelled: the client went away"))
        elif not outcome.ok:
            pending.resolve(error=JobFailed(outcome.error or "unknown error"))
        else:
            dispatch_ms = (time.perf_counter() - pending.started_at) * 1000.0
            self.encoder.submit(self._deliver, pending, outcome, dispatch_ms)

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

    def close(self, reason: str) -> None:
        """Answer whatever is still waiting or running (the loop may have died mid-job) and let the
        encoder finish the videos it holds."""
        self.queue.close(reason)
        for pending in self._running.values():
            pending.resolve(error=Unavailable(reason))
        self._running.clear()
        self.encoder.shutdown(wait=True)


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
        # remove the socket we bound (never a file that was there when we could not bind)
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


def agree_all_ok(d: Dist, ok: bool) -> bool:
    """One control-plane all-reduce after start-up: it returns only once every rank got here, and
    says whether every rank is ready (loaded, and on rank 0 listening)."""
    failed, _ = ControlPlane(d).any_flags(not ok, False)
    return not failed


def run_server(settings: ServerSettings, options: ServeOptions) -> int:
    """Every rank: join, load, agree, then loop; rank 0 also serves HTTP. Returns the exit status."""
    from wan_spmd.runtime import init_dist, load_pipeline, pipeline_runner, shutdown, spmd_loop
    from wan_spmd.server.app import ServerContext, create_app

    d = init_dist(options.device)
    ctx = http = source = None
    ok = True
    try:
        # 1. Rank 0 listens at once, so /health answers 503 while the model loads
        if d.is_main:
            ctx = ServerContext(settings, JobQueue(options.max_queue))
            http = HttpThread(create_app(ctx), options.host, options.port, options.uds)
            try:
                address = http.start()
                log.info("listening on %s (503 on /health until %d rank(s) have loaded)", address, d.world_size)
            except ValueError as exc:
                log.error("%s", exc)
                ok = False
        # 2. Every rank loads its shard
        pipe = None
        if ok:
            try:
                pipe = load_pipeline(d, settings.info, load_format=options.load_format)
            except Exception:
                log.exception("rank %d could not load the model", d.rank)
                ok = False
        # 3. Agree that all ranks loaded, then serve
        if not agree_all_ok(d, ok):
            if d.is_main:
                log.error("not every rank is ready; stopping")
                ctx.mark_stopping("failed")
            return 1
        if d.is_main:
            source = QueueJobSource(ctx.queue, options.output_dir)
        _install_stop_signals(d, source)
        if d.is_main:
            ctx.mark_ready()
            log.info(
                "ready: %s on %d rank(s), writing videos to %s",
                settings.served_model_name,
                d.world_size,
                options.output_dir,
            )
        jobs = spmd_loop(d, pipeline_runner(pipe, d.is_main), source)
        log.info("stopped after %d job(s)%s", jobs, f": {source.stop_reason}" if source and source.stop_reason else "")
        return 0
    finally:
        if ctx is not None:
            ctx.mark_stopping()
        if source is not None:
            source.close("the server is shutting down")
        elif ctx is not None:
            ctx.queue.close("the server is shutting down")
        if http is not None:
            http.stop()
        shutdown(d)


def _install_stop_signals(d: Dist, source: QueueJobSource | None) -> None:
    """SIGTERM/SIGINT: rank 0 cancels the running job, answers the queued ones 503 and broadcasts
    stop; other ranks (torchrun signals them too) wait for that broadcast rather than die mid-job.
    A dead rank 0 still ends them: their next control-plane call fails. Issue 6 hardens this."""

    def stop(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if source is not None:
            source.request_stop(f"the server is shutting down ({name})")
        else:
            log.warning("%s: waiting for rank 0 to stop the loop", name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
