"""Frames -> H.264 (yuv420p) mp4 through imageio-ffmpeg; rank 0 only."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

CRF = 18  # visually near-lossless; the default 23 smears the tiny model's noise
# x264's `medium` took 0.87 s for 81 smooth 832x480 frames and 4.85 s for noise on 2 cores;
# `veryfast` 0.44 s and 1.26 s, for files 18% larger and 5% smaller: encoding is rank 0's CPU
# work inside every request's e2e, so speed wins (docs/benchmarks.md).
PRESET = "veryfast"


def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """Write uint8 frames (F, H, W, 3) as an mp4; a temporary name is renamed into place when complete,
    so a reader never sees a half-written video."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    num_frames, height, width, _ = frames.shape
    # Not mkstemp: its 0600 would stick to the finished video; 0666 & ~umask is what a reader expects.
    tmp = str(path.parent / f".{path.stem}-{secrets.token_hex(6)}.mp4.part")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        writer = imageio_ffmpeg.write_frames(
            tmp,
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            macro_block_size=1,  # sizes are multiples of 16 already; never let ffmpeg resize
            output_params=["-crf", str(CRF), "-preset", PRESET, "-f", "mp4"],
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for frame in frames:
            writer.send(frame)
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_pngs(frames: np.ndarray, folder: str | Path) -> list[Path]:
    """Every frame as a lossless PNG (frame_00000.png ...), for editing tools and exact comparisons."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        p = folder / f"frame_{i:05d}.png"
        Image.fromarray(frame).save(p)
        paths.append(p)
    return paths


def probe_mp4(path: str | Path) -> dict:
    """Read an mp4 back: frame count, size, fps and codec, from ffmpeg itself."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    count = sum(1 for _ in reader)
    return {
        "num_frames": count,
        "width": meta["size"][0],
        "height": meta["size"][1],
        "fps": meta["fps"],
        "codec": meta.get("codec", ""),
        "pix_fmt": meta.get("pix_fmt", ""),
    }
