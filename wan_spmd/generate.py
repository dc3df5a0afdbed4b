"""The `generate` front: one job from the command line; the engine writes its mp4 on rank 0."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from wan_spmd.caches import COUNT_KEYS
from wan_spmd.jobs import Job, OfflineFront, Outcome, SourceBase, StopLoop


def timings_line(timings_ms: dict[str, float]) -> str:
    counts = (k in COUNT_KEYS or k.startswith("StepCache") for k in timings_ms)  # counts, not ms
    return " ".join(f"{k}={v:.0f}{'' if c else 'ms'}" for (k, v), c in zip(timings_ms.items(), counts, strict=True))


class OneJobSource(SourceBase):
    """Feeds a single job to the SPMD loop, then stops it; shows a progress bar over the steps."""

    def __init__(self, job: Job, output: Path) -> None:
        self.job = job
        self.output = output
        self.outcome: Outcome | None = None
        self._given = False
        self._bar: tqdm | None = None

    def next_job(self, timeout: float) -> Job | type[StopLoop]:
        if self._given or self.stop_reason is not None:
            return StopLoop
        self._given = True
        return self.job.start()

    def output_path(self, job: Job) -> Path:
        return self.output

    def on_step(self, job: Job, step: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, leave=False)
        self._bar.update(step - self._bar.n)

    def finish(self, outcome: Outcome) -> None:
        if self._bar is not None:
            self._bar.close()
        self.outcome = outcome
        if outcome.status == "deadline":
            print(f"error: generation failed: {outcome.stop.reason}", file=sys.stderr)
            return
        if outcome.stop is not None:
            print(f"error: generation {outcome.stop.reason}: {outcome.error}", file=sys.stderr)
            return
        if not outcome.ok:
            print(f"error: generation failed: {outcome.error}", file=sys.stderr)
            return
        params = outcome.job.params
        what = f"{params.num_frames} frames, {params.size}, {params.fps} fps, seed {params.seed}"
        print(f"wrote {outcome.video_path} ({what})")
        if outcome.job.frames_dir:
            print(f"wrote {params.num_frames} PNG frames to {outcome.job.frames_dir}")
        print(f"timings: {timings_line(outcome.timings_ms)}")
        if outcome.peak_memory is not None:
            print(f"memory: {outcome.peak_memory.describe()} (the maximum over ranks)")
        for warning in params.warnings:
            print(f"note: {warning}")


class GenerateFront(OfflineFront):
    """Rank 0's side of `generate`: exit 0 only if the video was written."""

    def __init__(self, job: Job, output: Path) -> None:
        self.source = OneJobSource(job, output)

    def stopped(self, lost: bool) -> None:
        if self.source._bar is not None:
            self.source._bar.close()

    def exit_code(self, jobs: int, signal_name: str | None) -> int:
        outcome = self.source.outcome
        return 0 if outcome is not None and outcome.ok else 1
