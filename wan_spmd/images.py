"""Input images: bytes from a client -> 8-bit RGB pixels, checked before anything is decoded.

An upload is the one part of a request whose cost is not visible in its size: a 657 KB PNG can
decode to 13000x13000 RGBA (1.3 GiB). So, in this order: the format is read from the header and
only PNG, JPEG and WebP are let in (Pillow would otherwise try every plugin it has: TIFF, DDS,
SGI...); the pixel count is read from the header and checked against `max_pixels`; then the image
is decoded, at most `DECODE_SLOTS` at a time in the whole process. Any exception a decoder raises
(they raise many kinds on corrupt files) becomes one `RequestError`.

What comes out is what diffusers' `load_image` makes of the same file (EXIF orientation applied,
then `convert("RGB")`, which drops alpha rather than compositing it), except on purpose for
16-bit and float images: Pillow's `convert("RGB")` clips them (a 16-bit grey PNG comes out nearly
white), and we scale them to 8 bits instead. The pixels travel to every rank inside the Job, so
rank 0 alone ever decodes. No torch here: the HTTP layer uses this module.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
BAND_BYTES = 8 << 20  # rows copied or scaled at a time: bounds the temporaries beside the image
EXIF_ORIENTATION = 0x0112
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transpose that shows the image upright (ImageOps.exif_transpose's table)."""
DECODE_SLOTS = threading.BoundedSemaphore(2)
"""Decodes running at once in this process: each may hold up to max_pixels x 8 bytes (16-bit RGBA)."""


class ImageError(ValueError):
    """An image that cannot be used; `images` is torch-free, so params wraps it in a RequestError."""


@dataclass(frozen=True)
class Pixels:
    """A decoded image as 8-bit RGB, row-major (height x width x 3 bytes): what the Job carries."""

    width: int
    height: int
    rgb: bytes | bytearray

    def __post_init__(self) -> None:
        if len(self.rgb) != self.width * self.height * 3:
            raise ValueError(f"{len(self.rgb)} bytes are not {self.width}x{self.height} RGB")

    def to_pil(self) -> Image.Image:
        """The PIL image the pipeline preprocesses, made without decoding anything."""
        return Image.frombytes("RGB", (self.width, self.height), self.rgb)

    def __repr__(self) -> str:  # never print megabytes into a log
        return f"Pixels({self.width}x{self.height})"


def decode(data: bytes, max_pixels: int) -> Pixels:
    """PNG, JPEG or WebP bytes -> 8-bit RGB pixels, or ImageError with one line saying why."""
    if not data:
        raise ImageError("is empty; send a PNG, JPEG or WebP image")
    with warnings.catch_warnings():
        # Pillow warns (DecompressionBombWarning) between its own limit and twice it; our own
        # limit is checked below, before decoding, so its warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.UnidentifiedImageError:
            raise ImageError("is not a readable image: only PNG, JPEG and WebP are accepted") from None
        except Image.DecompressionBombError:
            raise ImageError(f"has more than {max_pixels} pixels") from None
        except Exception as exc:  # a header that a plugin chokes on
            raise ImageError(f"is not a readable image ({type(exc).__name__})") from None
        with img:
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageError(f"has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageError(
                    f"is {width}x{height} = {width * height} pixels, over the {max_pixels}-pixel limit "
                    "(--max-image-pixels)"
                )
            with DECODE_SLOTS:
                try:
                    img.load()
                    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
                    rgb = to_rgb8(img)
                    img.close()  # the decoded planes go before the copies below are made
                    if orientation in ORIENTATIONS:  # what ImageOps.exif_transpose does, on the RGB copy
                        rgb = rgb.transpose(ORIENTATIONS[orientation])
                    return Pixels(rgb.width, rgb.height, _rgb_bytes(rgb))
                except ImageError:
                    raise
                except Exception as exc:  # truncated or corrupt data: decoders raise many kinds
                    raise ImageError(
                        f"is not a readable image (a corrupt or truncated {img.format}: {type(exc).__name__})"
                    ) from None


def _rgb_bytes(img: Image.Image) -> bytearray:
    """An RGB image's pixels, copied out a band of rows at a time into one buffer: `tobytes()`
    would hold its chunks and their joined copy at once (twice the image)."""
    width, height = img.size
    out = bytearray(width * height * 3)
    rows = max(1, BAND_BYTES // (width * 3))
    for top in range(0, height, rows):
        band = img.crop((0, top, width, min(height, top + rows))).tobytes()
        out[top * width * 3 : top * width * 3 + len(band)] = band
    return out


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB as diffusers' load_image makes it (`convert("RGB")`: alpha dropped, palettes
    expanded), with 16-bit and float greys scaled to 8 bits rather than clipped."""
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img)
        # 16-bit grey (PNG; "I" is how older Pillow opens it): 0..65535 -> 0..255. Float grey: 0..1.
        scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
        grey = np.empty(values.shape, np.uint8)
        rows = max(1, BAND_BYTES // (8 * max(1, values.shape[1])))
        for top in range(0, values.shape[0], rows):  # a band at a time: float64 temporaries stay small
            band = np.nan_to_num(values[top : top + rows].astype(np.float64) * scale, nan=0.0, posinf=255.0, neginf=0.0)
            grey[top : top + rows] = np.clip(np.rint(band), 0, 255)
        img = Image.fromarray(grey)
    return img.convert("RGB")


def read_file(path: str | Path, max_bytes: int) -> bytes:
    """An image path from the CLI or a JSONL line as bytes: a regular file only (never a FIFO, a
    device or a folder), its size checked before reading and read no further than `max_bytes`.
    ImageError says why not, without the path (the caller names it)."""
    text = str(path)
    if "\0" in text:
        raise ImageError("the path has a NUL character")
    try:
        resolved = Path(text).expanduser()
    except RuntimeError:  # `~nosuchuser/x.png`
        raise ImageError("the path names a home folder that does not exist") from None
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ImageError(exc.strerror or str(exc)) from None
    except (UnicodeError, ValueError) as exc:  # a name the filesystem cannot encode
        raise ImageError(f"the path cannot be a file name ({type(exc).__name__})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not a regular file")
        if info.st_size > max_bytes:
            raise ImageError(f"it is {info.st_size} bytes, over the {max_bytes}-byte limit")
        chunks, size = [], 0
        while size <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise ImageError(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew while we read it
        raise ImageError(f"it is over the {max_bytes}-byte limit")
    return data
