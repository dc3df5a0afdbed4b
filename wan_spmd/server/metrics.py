"""Prometheus metrics of one server, on a registry of its own (so apps built in tests never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from wan_spmd.caches import COUNT_KEYS
from wan_spmd.memory import MIB, PeakMemory

# Stage latencies run from milliseconds (tiny model on CPU) to many minutes (A14B at 720p).
BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 2400)


class ServerMetrics:
    """Queue depth, jobs running, requests by endpoint and outcome, and stage latencies."""

    def __init__(
        self,
        queue_depth: Callable[[], int],
        ready: Callable[[], bool],
        running: Callable[[], int] = lambda: 0,
        video_counts: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        depth = Gauge("wan_spmd_queue_depth", "Requests waiting for the SPMD loop.", registry=self.registry)
        depth.set_function(queue_depth)
        taken = Gauge(
            "wan_spmd_jobs_running", "Requests the loop took and has not answered yet.", registry=self.registry
        )
        taken.set_function(running)
        up = Gauge("wan_spmd_ready", "1 once every rank has loaded the model.", registry=self.registry)
        up.set_function(lambda: float(ready()))
        if video_counts is not None:
            videos = Gauge(
                "wan_spmd_videos",
                "Video jobs this replica knows, by status (queued, in_progress, completed, failed).",
                ["status"],
                registry=self.registry,
            )
            for status in ("queued", "in_progress", "completed", "failed"):
                videos.labels(status=status).set_function(lambda status=status: video_counts().get(status, 0))
        self.requests = Counter(
            "wan_spmd_requests",
            "Video requests by endpoint and outcome (ok, accepted: queued asynchronously, invalid, too_large, "
            "unsupported_media_type, unknown_model, unauthorized, forbidden, queue_full, disconnected, unavailable, "
            "failed).",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.connections_open = 0
        """HTTP connections held now; the transport (server/http.py) keeps it current."""
        held = Gauge(
            "wan_spmd_connections", "HTTP connections open now (at most --max-connections).", registry=self.registry
        )
        held.set_function(lambda: self.connections_open)
        self.connections_closed = Counter(
            "wan_spmd_connections_closed",
            "HTTP connections the server closed on its own, by reason (header_timeout, body_timeout, "
            "send_timeout: its answer unread for --send-timeout; evicted: idle or its answer stalled, closed to "
            "make room; refused: over --max-connections with none idle or stalled).",
            ["reason"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "wan_spmd_stage_seconds",
            "Latency of each stage of a finished request (pipeline stages, PipelineWall, server parts).",
            ["stage"],
            buckets=BUCKETS_S,
            registry=self.registry,
        )
        # absent until a job has run on a GPU: the CPU has no peak to report
        self.peak_memory = Gauge(
            "wan_spmd_job_peak_memory_bytes",
            "Peak GPU memory of the last completed job, the maximum over ranks, by kind (allocated by tensors, "
            "reserved by the allocator: what the card must hold).",
            ["kind"],
            registry=self.registry,
        )
        self.max_peak_memory = Gauge(
            "wan_spmd_max_job_peak_memory_bytes",
            "The largest job peak GPU memory since the server started, the maximum over ranks, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self._max_peak: dict[str, float] = {}
        self.cache_lookups = Counter(
            "wan_spmd_cache_lookups",
            "Lookups in the caches kept across requests (prompt embeddings, I2V conditions), by result "
            "(hit: no encode at all; miss).",
            ["cache", "result"],
            registry=self.registry,
        )
        self.step_cache_forwards = Counter(
            "wan_spmd_step_cache_forwards",
            "Transformer forwards of finished requests under --cache-backend, by expert and whether the "
            "step cache skipped them (StepCacheSkipped/<expert> of StepCacheForwards/<expert>).",
            ["expert", "result"],
            registry=self.registry,
        )

    def observe_memory(self, peak: PeakMemory) -> None:
        """The last completed job's peak GPU memory (max over ranks), and the largest since start."""
        for kind, mib in (("allocated", peak.allocated_mb), ("reserved", peak.reserved_mb)):
            self._max_peak[kind] = max(self._max_peak.get(kind, 0.0), mib * MIB)
            self.peak_memory.labels(kind=kind).set(mib * MIB)
            self.max_peak_memory.labels(kind=kind).set(self._max_peak[kind])

    def count(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason=reason).inc()

    def observe(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            if stage in COUNT_KEYS:  # a count of cache lookups, not a latency
                cache, result = COUNT_KEYS[stage]
                self.cache_lookups.labels(cache=cache, result=result).inc(ms)
                continue
            if stage.startswith("StepCache"):  # the step cache's forward counts, not a latency
                kind, _, expert = stage.partition("/")
                result = "skipped" if kind == "StepCacheSkipped" else "all"
                self.step_cache_forwards.labels(expert=expert, result=result).inc(ms)
                continue
            self.stage_seconds.labels(stage=stage).observe(ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
