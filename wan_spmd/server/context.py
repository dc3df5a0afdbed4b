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
    """The name /v1/models lists first, and the one jobs report when a request names none."""
    limits: Limits = Limits()
    api_key: str | None = None
    """When set, every endpoint but /health needs `Authorization: Bearer KEY`; when not, requests must
    be addressed to the server's own address (Host) and come from no other web origin (Origin)."""
    world_size: int = 1
    loras: tuple[dict[str, Any], ...] = ()
    """What was fused at launch (`LoraSpec.card`: file name, scale, experts, content hash; no path)."""
    model_aliases: tuple[str, ...] = ()
    """More names a request may give for the model (--served-model-name given more than once)."""
    sync_videos: bool = False
    """POST /v1/videos from a plain client waits and answers the mp4 as base64 (vllm-omni's earlier
    API); the OpenAI SDK's requests and `Prefer: respond-async` stay asynchronous."""
    strict_sizes: bool = False
    """A size or frame count the model cannot take is a 400, not rounded (a request's `strict` wins)."""

    @property
    def served_model_names(self) -> tuple[str, ...]:
        return (self.served_model_name, *(a for a in self.model_aliases if a != self.served_model_name))


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
        model = pending.model or self.settings.served_model_name
        record = VideoRecord.new(pending.id, pending.params, model, time.time(), seconds=pending.seconds)
        pending.admitted = record.public()
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
