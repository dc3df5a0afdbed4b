"""Small bounded caches across requests: prompt embeddings and I2V condition latents.

Users make many videos from one image and one prompt with other seeds. The text encoder's output
depends only on the text (and the encoder), the I2V condition only on the image's pixels, the size,
the frame count and the VAE, never on the seed: so both are kept, least recently used first out,
and a repeated prompt or image costs no encode at all. Exact by construction: a hit hands back the
very tensor the miss computed (nothing downstream writes into it).

Every rank keeps its own caches and sees the same jobs in the same order. The text encoder runs on
each rank alone, so ranks that disagree about a prompt would only cost time. The condition's encode
is collective under a row-split VAE, so there a lookup's answer is agreed first (`agree`, one tiny
all-reduce): a hit on some ranks and a miss on others becomes a miss on all, and all encode.

Memory per entry (on the device): a prompt is (1, 512, 4096) in the experts' dtype, 4 MiB in bf16
(8 MiB in fp32 on the CPU); a condition is (1, 20, T_lat, H/8, W/8) fp32: 24.2 MB at 1280x720x81
(20 x 21 x 90 x 160 x 4 bytes), 10.5 MB at 832x480x81.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

COUNT_KEYS = {
    "PromptCacheHits": ("prompt", "hit"),
    "PromptCacheMisses": ("prompt", "miss"),
    "ConditionCacheHits": ("condition", "hit"),
    "ConditionCacheMisses": ("condition", "miss"),
}
"""The job's timings keys that are counts of cache lookups, not milliseconds: (cache, result)."""


class LruCache(Generic[V]):
    """At most `capacity` entries (0: nothing is kept, every lookup misses), least recent out first;
    `hits`/`misses` count lookups since it was made."""

    def __init__(self, name: str, capacity: int, agree: Callable[[bool], bool] | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"a cache holds >= 0 entries, got {capacity}")
        self.name, self.capacity, self.agree = name, capacity, agree
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The entry for `key`, else `make()`, kept (the oldest entry out when full)."""
        found = self._entries.get(key)
        hit = found is not None
        if self.agree is not None:
            hit = self.agree(hit)
        if hit:
            self.hits += 1
            self._entries.move_to_end(key)
            return found  # type: ignore[return-value]
        self.misses += 1
        value = make()
        if self.capacity:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def counts(self) -> tuple[int, int]:
        return self.hits, self.misses


def pixels_digest(width: int, height: int, rgb: bytes) -> str:
    """The decoded image's identity: its size and the sha256 of its RGB bytes (3 ms for 1280x720)."""
    return f"{width}x{height}:{hashlib.sha256(rgb).hexdigest()}"


def lookup_counts(caches: dict[str, LruCache | None], before: dict[str, tuple[int, int]]) -> dict[str, float]:
    """The hits and misses since `before` (from `snapshot`) as the job's timings keys."""
    out: dict[str, float] = {}
    for name, cache in caches.items():
        if cache is None:
            continue
        hits, misses = cache.counts()
        out[f"{name}CacheHits"] = float(hits - before[name][0])
        out[f"{name}CacheMisses"] = float(misses - before[name][1])
    return out


def snapshot(caches: dict[str, LruCache | None]) -> dict[str, tuple[int, int]]:
    return {name: cache.counts() for name, cache in caches.items() if cache is not None}
