"""The server's shared state and settings: what the app and its routers both read (a module of
its own, so app -> routes -> context has no cycle). No torch."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from wan_spmd.config import ModelInfo
from wan_spmd.params import Limits
from wan_spmd.server.metrics import ServerMetrics
from wan_spmd.server.queue import JobQueue, PendingVideo
from wan_spmd.server.videos import VideoRecord, VideoStore, default_replica_name

ARRIVED = "wan_spmd.arrived"  # scope key: perf_counter when the request's headers arrived
VIDEO_PATHS = ("/v1/videos", "/v1/videos/sync")


@dataclass(frozen=True)
class ServerSettings:
    """What the server was started with."""

    info: ModelInfo
    defaults: dict[str, Any]
    """Generation defaults (config.generation_defaults), read once at start-up."""
    served_model_name: str
    """The name /v1/models lists; a request naming another model gets 404."""
    limits: Limits = Limits()
    api_key: str | None = None
    """When set, every endpoint but /health needs `Authorization: Bearer KEY`; when not, requests must
    be addressed to the server's own address (Host) and come from no other web origin (Origin)."""
    world_size: int = 1
    loras: tuple[dict[str, Any], ...] = ()
    """What was fused at launch (`LoraSpec.card`: file name, scale, experts, content hash; no path)."""
    async_videos: bool = False
    """POST /v1/videos answers a queued job at once for every client, not only for those that ask
    (`Prefer: respond-async`) or are the OpenAI SDK."""


@dataclass
class ServerContext:
    """The app's shared state: settings, the queue to the SPMD loop, metrics, readiness."""

    settings: ServerSettings
    queue: JobQueue
    status: str = "loading"
    """loading -> ok -> stopping (or failed); /health answers 200 only while ok."""
    ready: threading.Event = field(default_factory=threading.Event)
    videos: VideoStore = field(default_factory=lambda: VideoStore(None, default_replica_name()))
    """Every job's record (status, progress, files); memory-only unless the serve front gives one on disk."""
    metrics: ServerMetrics = field(init=False)
    live: dict[str, PendingVideo] = field(default_factory=dict)
    """Admitted jobs not yet answered, by id: what DELETE withdraws from the queue or the loop."""

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(
            lambda: self.queue.depth, self.ready.is_set, lambda: self.queue.running, self.videos.counts
        )

    def track(self, pending: PendingVideo) -> None:
        """Record a job about to be submitted (before the loop can take it) and keep its queue
        entry until it is answered."""
        record = VideoRecord.new(pending.id, pending.params, self.settings.served_model_name, time.time())
        self.videos.add(record)
        self.live[pending.id] = pending
        pending.future.add_done_callback(lambda _, done=pending.id: self.live.pop(done, None))

    def untrack(self, video_id: str) -> None:
        """A job that never got into the queue (it closed meanwhile): no record of it."""
        self.live.pop(video_id, None)
        self.videos.delete(video_id)

    def mark_ready(self) -> None:
        """Every rank has loaded: start admitting requests."""
        self.status = "ok"
        self.ready.set()

    def mark_stopping(self, status: str = "stopping") -> None:
        self.status = status
        self.ready.clear()
