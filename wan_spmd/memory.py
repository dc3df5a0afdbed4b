"""GPU memory, without torch: what a job's peak was, and where the model's parts should live.

Two things live here because both are arithmetic over numbers:
- `PeakMemory`: a job's peak GPU memory (allocated and reserved by torch's caching allocator),
  the maximum over ranks, as the fronts report it;
- the placement planner: given a model's facts, the parallel layout, the precision, the largest
  request the server admits and a budget per card, the cheapest placement that fits, chosen before
  anything loads (so a budget nothing fits is refused with the numbers, exit 2).

"MB" in the names and fields is MiB (2**20 bytes), as nvidia-smi counts; "GB" in the flag and the
plan is GiB for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class PeakMemory:
    """A job's peak GPU memory in MiB, the maximum over ranks (each rank's own peak, reset when the
    job started). `reserved_mb` is what the card must hold (the allocator's segments); `allocated_mb`
    what tensors used of it."""

    allocated_mb: float
    reserved_mb: float

    @property
    def peak_memory_mb(self) -> float:
        """The one number the job record and X-Peak-Memory-MB carry: reserved, what must fit the card."""
        return self.reserved_mb

    def describe(self) -> str:
        return f"peak GPU memory {self.allocated_mb:,.0f} MiB allocated, {self.reserved_mb:,.0f} MiB reserved"

    def fields(self) -> dict[str, float]:
        """For JSON lines: rounded to a tenth of a MiB."""
        return {"peak_memory_mb": round(self.reserved_mb, 1), "peak_allocated_mb": round(self.allocated_mb, 1)}
