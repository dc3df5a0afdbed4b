"""mp4 writing through ffmpeg, read back with ffmpeg."""

from __future__ import annotations

import numpy as np
from PIL import Image

from wan_spmd.video import probe_mp4, write_mp4, write_pngs


def test_mp4_has_requested_frames_size_fps_and_codec(tmp_path):
    """A player must see H.264 yuv420p at the requested fps with every frame, no resizing."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(17, 48, 80, 3), dtype=np.uint8)
    path = write_mp4(frames, tmp_path / "v.mp4", fps=12)
    meta = probe_mp4(path)
    assert meta["num_frames"] == 17 and (meta["width"], meta["height"]) == (80, 48)
    assert meta["fps"] == 12
    assert meta["codec"].startswith("h264") and meta["pix_fmt"].startswith("yuv420p")
    assert not list(tmp_path.glob("*.part"))  # the temporary name is gone
    data = path.read_bytes()
    assert data[4:8] == b"ftyp" and len(data) > 1000


def test_pngs_are_lossless(tmp_path):
    frames = np.random.default_rng(1).integers(0, 255, size=(3, 16, 32, 3), dtype=np.uint8)
    paths = write_pngs(frames, tmp_path / "frames")
    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    assert np.array_equal(np.asarray(Image.open(paths[1])), frames[1])
