"""Rank 0's one path from decoded frame chunks to a complete, verified mp4.

Each chunk arrives as uint8 frames on the device (the pipeline converts on the device, so no float
copy of the video ever reaches the host); it is copied to the host and handed to the writer thread,
which encodes it while the VAE decodes the next chunk. No front encodes video itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import torch

from wan_spmd.params import GenerationParams
from wan_spmd.video import Mp4Writer, write_pngs


def deliver(
    chunks: Iterable[torch.Tensor], path: Path, params: GenerationParams, frames_dir: Path | None = None
) -> tuple[Path, dict[str, float]]:
    """Stream the chunks into `path` (renamed into place once verified); also PNGs into `frames_dir`.

    Returns the path and {"Mp4Encoding": ms}: the writer's time after the last chunk, the part of
    encoding that decoding did not hide.
    """
    written = 0
    with Mp4Writer(path, params.width, params.height, params.fps) as writer:
        for chunk in chunks:
            frames = chunk.cpu().numpy()  # (f, H, W, 3) uint8
            writer.put(frames)
            if frames_dir is not None:
                write_pngs(frames, frames_dir, start=written)
            written += len(frames)
        if written != params.num_frames:
            raise RuntimeError(f"the decoder gave {written} frames, {params.num_frames} were asked for")
        start = time.perf_counter()
        final = writer.finish()
    return final, {"Mp4Encoding": (time.perf_counter() - start) * 1000.0}
