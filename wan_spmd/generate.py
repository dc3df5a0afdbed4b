"""The `generate` front: one job from the command line, its video written by rank 0."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from wan_spmd.runtime import Job, Outcome, StopLoop


def timings_line(timings_ms: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.0f}ms" for k, v in timings_ms.items())


@dataclass
class OneJobSource:
    """Feeds a single job to the SPMD loop, then stops it; shows a progress bar over the steps."""

    job: Job
    output: Path
    frames_dir: Path | None = None
    outcome: Outcome | None = None
    _given: bool = False
    _bar: tqdm | None = None

    def next_job(self, timeout: float) -> Job | type[StopLoop]:
        if self._given:
            return StopLoop
        self._given = True
        return self.job

    def is_cancelled(self, job: Job) -> bool:
        return False

    def on_step(self, job: Job, step: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, leave=False)
        self._bar.update(step - self._bar.n)

    def finish(self, outcome: Outcome) -> None:
        from wan_spmd.video import write_mp4, write_pngs

        if self._bar is not None:
            self._bar.close()
        self.outcome = outcome
        if not outcome.ok:
            print(f"error: generation failed: {outcome.error}", file=sys.stderr)
            return
        params = outcome.job.params
        frames = outcome.result.frames.numpy()
        write_mp4(frames, self.output, params.fps)
        print(f"wrote {self.output} ({params.num_frames} frames, {params.size}, {params.fps} fps, seed {params.seed})")
        if self.frames_dir is not None:
            write_pngs(frames, self.frames_dir)
            print(f"wrote {len(frames)} PNG frames to {self.frames_dir}")
        print(f"timings: {timings_line(outcome.result.timings_ms)}")
        for warning in params.warnings:
            print(f"note: {warning}")
