"""Frames -> H.264 (yuv420p) mp4 through imageio-ffmpeg's ffmpeg binary; rank 0 only, no torch.

One writer for every front. It takes frames in chunks as the VAE decodes them and feeds ffmpeg
from a thread of its own, so encoding overlaps decoding. A video is complete only when ffmpeg
exited 0 and the file reads back with every frame; only then is it renamed into place. A failed
write (full disk, ffmpeg killed) raises and leaves no file behind, temporary or final.

Names are handed to ffmpeg as `file:` + an absolute path, so no name (`clip:1.mp4`) can be read as
a protocol.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import subprocess
import tempfile
import threading
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

CRF = 18  # visually near-lossless; the default 23 smears the tiny model's noise
# x264's `medium` took 0.87 s for 81 smooth 832x480 frames and 4.85 s for noise on 2 cores;
# `veryfast` 0.44 s and 1.26 s, for files 18% larger and 5% smaller: encoding is rank 0's CPU
# work inside every request's e2e, so speed wins (docs/benchmarks.md).
PRESET = "veryfast"
PART_SUFFIX = ".mp4.part"
PART_TOKEN_HEX = 12
"""Random hex characters in a temporary name; `stale_parts` matches exactly this many."""
QUEUED_CHUNKS = 4
"""Chunks waiting for ffmpeg at most: bounds host memory if the encoder falls behind the VAE."""
STDERR_TAIL = 2000


class VideoWriteError(RuntimeError):
    """ffmpeg failed or the file did not read back complete (one line, says why)."""


def ffmpeg_path(path: Path) -> str:
    """`file:` + absolute path: ffmpeg reads `clip:1.mp4` as protocol `clip` otherwise."""
    return "file:" + str(Path(path).absolute())


def part_name(video: Path) -> Path:
    """The temporary name a video is written under, beside it (hidden, so listings skip it)."""
    return video.parent / f".{video.stem}-{secrets.token_hex(PART_TOKEN_HEX // 2)}{PART_SUFFIX}"


def stale_parts(video: Path) -> list[Path]:
    """Temporary files a killed writer left for `video`, matched exactly as `part_name` makes them,
    so another video in flight in the same folder (`a-b.mp4` beside `a.mp4`) is never touched."""
    pattern = re.compile(rf"\.{re.escape(video.stem)}-[0-9a-f]{{{PART_TOKEN_HEX}}}{re.escape(PART_SUFFIX)}")
    if not video.parent.is_dir():
        return []
    return sorted(p for p in video.parent.iterdir() if pattern.fullmatch(p.name))


def count_frames(path: Path) -> int:
    """Video frames in a file, counted by ffmpeg as one checksum line per packet (`framemd5` of a
    stream copy: no decoding, so it is quick, and the same output on every ffmpeg version)."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", ffmpeg_path(path)]
    cmd += ["-map", "0:v:0", "-c", "copy", "-f", "framemd5", "-"]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise VideoWriteError(f"ffmpeg cannot read {path.name} back: {_last_line(proc.stderr)}")
    return sum(1 for line in proc.stdout.splitlines() if line.strip() and not line.startswith(b"#"))


def _last_line(data: bytes) -> str:
    lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


class Mp4Writer:
    """Streams uint8 frames (F, H, W, 3) into one mp4; `finish` returns its path once complete.

    `put` hands a chunk to the writer thread and returns at once (it blocks only when
    `QUEUED_CHUNKS` chunks already wait). Use as a context manager: leaving it without `finish`
    (an exception) aborts the write and removes the temporary file.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: int) -> None:
        self.path = Path(path)
        self.size = (width, height)
        self.frames_in = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=QUEUED_CHUNKS)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # found (and checked by running it, in our process group) before the temporary file exists:
        # a failure here, or a signal to the group that kills the check, leaves nothing behind
        exe = imageio_ffmpeg.get_ffmpeg_exe()
        self.tmp = part_name(self.path)
        # Not mkstemp: its 0600 would stick to the finished video; 0666 & ~umask is what a reader expects.
        os.close(os.open(self.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        self._stderr = tempfile.TemporaryFile()  # a pipe could fill and stall ffmpeg while we write
        cmd = [
            exe,
            "-nostdin",
            "-y",
            "-loglevel",
            "error",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            str(fps),
            "-i",
            "-",
            "-an",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            str(CRF),
            "-preset",
            PRESET,
            "-f",
            "mp4",
            ffmpeg_path(self.tmp),
        ]
        # its own session: Ctrl-C or a supervisor's signal to our process group must reach the engine,
        # which stops at the next chunk and aborts this write, not kill the encoder first
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True
            )
        except BaseException:  # no writer: leave no temporary file either
            self._stderr.close()
            self.tmp.unlink(missing_ok=True)
            raise
        self._thread = threading.Thread(target=self._feed, name="mp4-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is not None:
            self.abort()

    def _feed(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            while (chunk := self._queue.get()) is not None:
                if self._error is None:
                    stdin.write(memoryview(chunk).cast("B"))
        except BaseException as exc:  # BrokenPipe when ffmpeg died: reported by finish
            self._error = exc
            while self._queue.get() is not None:  # drain, so put() never blocks on a dead writer
                pass
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    def put(self, frames: np.ndarray) -> None:
        """Queue a chunk of uint8 frames (F, H, W, 3) for the encoder."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.size[1], self.size[0], 3):
            raise ValueError(
                f"frames must be uint8 (F, {self.size[1]}, {self.size[0]}, 3), got {frames.dtype} {frames.shape}"
            )
        self.frames_in += len(frames)
        self._queue.put(np.ascontiguousarray(frames))

    def finish(self) -> Path:
        """Wait for ffmpeg; check its exit status and the frames read back; rename into place."""
        try:
            self._queue.put(None)
            self._thread.join()
            code = self._proc.wait()
            if code != 0 or self._error is not None:
                self._stderr.seek(0)
                why = _last_line(self._stderr.read()[-STDERR_TAIL:]) if code else repr(self._error)
                raise VideoWriteError(f"ffmpeg could not write {self.path.name} (exit status {code}): {why}")
            if os.path.getsize(self.tmp) == 0:
                raise VideoWriteError(f"ffmpeg wrote an empty file for {self.path.name}")
            found = count_frames(self.tmp)
            if found != self.frames_in:
                raise VideoWriteError(f"{self.path.name} holds {found} frames, {self.frames_in} were written")
            os.replace(self.tmp, self.path)
            return self.path
        except BaseException:
            self.abort()
            raise
        finally:
            self._stderr.close()

    def abort(self) -> None:
        """Stop ffmpeg and remove the temporary file (the final name is never touched)."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._thread.join(timeout=5)
        self.tmp.unlink(missing_ok=True)


def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """All frames (F, H, W, 3) at once: the writer above with one chunk."""
    frames = np.asarray(frames, dtype=np.uint8)
    with Mp4Writer(path, frames.shape[2], frames.shape[1], fps) as writer:
        writer.put(frames)
        return writer.finish()


def write_pngs(frames: np.ndarray, folder: str | Path, start: int = 0) -> list[Path]:
    """Frames as lossless PNGs (frame_00000.png ...), numbered from `start`, for editing tools and
    exact comparisons."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames, start=start):
        p = folder / f"frame_{i:05d}.png"
        Image.fromarray(frame).save(p)
        paths.append(p)
    return paths


def probe_mp4(path: str | Path) -> dict:
    """Read an mp4 back: frame count, size, fps and codec, from ffmpeg itself."""
    reader = imageio_ffmpeg.read_frames(ffmpeg_path(Path(path)))
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


def first_frame_jpeg(mp4: Path, out: Path) -> Path:
    """A JPEG of the video's first frame at its own size (a thumbnail), written atomically: ffmpeg
    writes a temporary name beside `out`, which is renamed into place only once it exited 0."""
    tmp = out.parent / f".{out.stem}-{secrets.token_hex(4)}.jpg.part"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-i", ffmpeg_path(mp4)]
    cmd += ["-frames:v", "1", "-q:v", "3", "-f", "mjpeg", ffmpeg_path(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
        if proc.returncode != 0:
            raise VideoWriteError(f"ffmpeg could not take the first frame of {mp4.name}: {_last_line(proc.stderr)}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
