"""Hand-made image files for the hostile-input tests: what Pillow will not write (16-bit RGB PNG) or
could not afford to build in memory (a decompression bomb: the rows are zlib-streamed)."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows) -> bytes:
    """A PNG from an iterable of raw rows (filter byte 0 prepended here), compressed as it streams."""
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\0" + row) for row in rows) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@functools.lru_cache(maxsize=2)
def bomb_png(side: int = 13000) -> bytes:
    """side x side RGBA of zeros: the issue's 657 KB file that decodes to side^2 x 4 bytes (1.3 GiB at 13000)."""
    row = bytes(side * 4)
    return png_bytes(side, side, 8, 6, (row for _ in range(side)))


def png16_rgb(values: np.ndarray) -> bytes:
    """(H, W, 3) uint16 -> a 16-bit RGB PNG."""
    h, w, _ = values.shape
    return png_bytes(w, h, 16, 2, (values[y].astype(">u2").tobytes() for y in range(h)))


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def gradient(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    """A picture whose pixels differ everywhere (so a rotation or a channel mix-up shows)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "RGBA":
        img.putalpha(Image.fromarray(((x * 7) % 256).astype(np.uint8)))
    return img if mode in ("RGB", "RGBA") else img.convert(mode)
