"""x264 preset against encoding time and size, for 81 frames at 832x480 (run on any CPU).

python benchmarks/mp4_presets.py
"""

from __future__ import annotations

import os
import tempfile
import time

import imageio_ffmpeg
import numpy as np

from wan_spmd.video import CRF


def frames(kind: str) -> np.ndarray:
    if kind == "noise":  # what dummy weights decode to: the worst case for an encoder
        return np.random.default_rng(0).integers(0, 255, (81, 480, 832, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:480, 0:832]  # moving gradients: closer to a real video
    planes = [np.stack([(xx + 4 * t) % 256, (yy + 2 * t) % 256, ((xx + yy) // 2 + t) % 256], -1) for t in range(81)]
    return np.stack(planes).astype(np.uint8)


def main() -> None:
    for kind in ("smooth", "noise"):
        video = frames(kind)
        for preset in ("medium", "veryfast", "ultrafast"):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "v.mp4")
                start = time.perf_counter()
                writer = imageio_ffmpeg.write_frames(
                    path,
                    (832, 480),
                    fps=16,
                    codec="libx264",
                    macro_block_size=1,
                    output_params=["-crf", str(CRF), "-preset", preset],
                    ffmpeg_log_level="error",
                )
                writer.send(None)
                for frame in video:
                    writer.send(frame)
                writer.close()
                seconds, kib = time.perf_counter() - start, os.path.getsize(path) // 1024
                print(f"{kind:7s} {preset:10s} {seconds:6.2f} s {kib:7d} KiB")


if __name__ == "__main__":
    main()
