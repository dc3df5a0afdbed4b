"""Input images (issue 20): what is let in, what it costs before it is refused, and what comes out.
Each test names the defect it guards; numbers are asserted, with wide margins where time is involved."""

from __future__ import annotations

import io
import os
import resource
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from diffusers.utils import load_image
from PIL import Image

from tests.images_util import bomb_png, encode, gradient, png16_rgb
from wan_spmd.images import ImageError, Pixels, decode, read_file, to_rgb8
from wan_spmd.params import Limits

MAX_PIXELS = Limits.max_image_pixels


def _rgb(pixels: Pixels) -> np.ndarray:
    return np.frombuffer(pixels.rgb, np.uint8).reshape(pixels.height, pixels.width, 3)


def test_bomb_is_refused_from_its_header():
    """The issue's 657 KB PNG of 13000x13000 RGBA: refused by its header's pixel count, in well under
    a second and without the 676 MB (1.3 GiB in Pillow) its decode would take. If this fails, one
    upload takes gigabytes and seconds of the HTTP thread."""
    data = bomb_png()
    assert len(data) < 700_000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    with pytest.raises(ImageError, match="13000x13000 = 169000000 pixels, over the 25000000-pixel limit"):
        decode(data, MAX_PIXELS)
    assert time.perf_counter() - start < 1.0  # decoding takes 3.6 s; the header check milliseconds
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 50 * 1024, f"peak memory grew {grown_kib} KiB"


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "DDS", "SGI", "PPM", "ICO", "TGA"])
def test_only_png_jpeg_webp(fmt):
    """Formats outside PNG/JPEG/WebP are refused before any plugin decodes them (the issue reached
    TIFF, DDS, SGI...). If this fails, every Pillow decoder is attack surface."""
    data = encode(gradient(16, 16), fmt)
    Image.open(io.BytesIO(data)).load()  # Pillow itself reads it
    with pytest.raises(ImageError, match="only PNG, JPEG and WebP"):
        decode(data, MAX_PIXELS)


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(gradient(), "PNG"),
        lambda: encode(gradient(mode="RGBA"), "PNG"),  # alpha: dropped, as convert("RGB") does
        lambda: encode(gradient(mode="LA"), "PNG"),
        lambda: encode(gradient(mode="L"), "PNG"),
        lambda: encode(gradient().convert("P", palette=PIL.Image.Palette.ADAPTIVE), "PNG", transparency=0),
        lambda: encode(gradient(), "JPEG", quality=90),
        lambda: encode(gradient().convert("CMYK"), "JPEG"),
        lambda: encode(gradient(mode="RGBA"), "WEBP", lossless=True),
        lambda: encode(gradient(), "WEBP", quality=80),
        lambda: encode(gradient(), "JPEG", exif=_orientation(6)),
        lambda: encode(gradient(mode="RGBA"), "PNG", exif=_orientation(8)),
    ],
    ids=["rgb", "rgba", "la", "grey", "palette-transparent", "jpeg", "cmyk", "webp-rgba", "webp", "exif6", "exif8"],
)
def test_same_pixels_as_diffusers_load_image(make, tmp_path: Path):
    """For ordinary 8-bit images we give the pipeline exactly what diffusers' load_image gives its own
    (EXIF orientation, alpha dropped, palettes expanded): if this fails, our I2V differs from
    diffusers' on the same file."""
    data = make()
    path = tmp_path / "in.img"
    path.write_bytes(data)
    expected = np.asarray(load_image(str(path)))
    got = _rgb(decode(data, MAX_PIXELS))
    assert got.shape == expected.shape and np.array_equal(got, expected)


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def test_exif_orientation_turns_phone_photos_upright():
    """A 64x48 JPEG tagged 'rotate 90 CW' (orientation 6) comes out 48x64 and rotated; if this fails,
    phone photos arrive sideways and the derived video size is wrong."""
    img = gradient(64, 48)
    pixels = decode(encode(img, "PNG", exif=_orientation(6)), MAX_PIXELS)
    assert (pixels.width, pixels.height) == (48, 64)
    assert np.array_equal(_rgb(pixels), np.asarray(img.transpose(Image.Transpose.ROTATE_270)))


def test_16_bit_and_float_are_scaled_not_clipped():
    """A 16-bit grey PNG of 32768 is mid-grey (128), not white; 16-bit RGB keeps its colours; a float
    image of 0.25 is 64. We differ from diffusers here on purpose (its convert("RGB") clips: 255). If
    this fails, 16-bit images come out nearly white and float ones black."""
    grey16 = encode(Image.fromarray(np.full((8, 8), 32768, np.uint16)), "PNG")
    assert Image.open(io.BytesIO(grey16)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # the defect
    assert set(decode(grey16, MAX_PIXELS).rgb) == {128}
    ramp = np.linspace(0, 65535, 8 * 8 * 3).round().astype(np.uint16).reshape(8, 8, 3)
    got = _rgb(decode(png16_rgb(ramp), MAX_PIXELS)).astype(int)
    assert np.abs(got - ramp / 257).max() <= 1.0
    as_float = Image.fromarray(np.full((4, 4), 0.25, np.float32))
    assert set(to_rgb8(as_float).tobytes()) == {64}


def test_corrupt_files_are_one_error_type():
    """Every truncation and 600 random byte mutations of a PNG, a JPEG and a WebP raise ImageError
    or decode; nothing else escapes. If this fails, a corrupt upload is a 500 (decoders raise many
    exception types)."""
    rng = np.random.default_rng(20)
    sources = [encode(gradient(), fmt) for fmt in ("PNG", "JPEG", "WEBP")]
    cases = [src[:n] for src in sources for n in range(0, len(src), max(1, len(src) // 50))]
    for src in sources:
        for _ in range(200):
            mutated = bytearray(src)
            for pos in rng.integers(0, len(src), rng.integers(1, 8)):
                mutated[pos] = rng.integers(0, 256)
            cases.append(bytes(mutated))
    start, refused = time.perf_counter(), 0
    for data in cases:
        try:
            decode(data, MAX_PIXELS)
        except ImageError:
            refused += 1
    assert refused > len(cases) // 4 and time.perf_counter() - start < 60


def test_image_paths_must_be_regular_files(tmp_path: Path):
    """A path is opened without blocking, checked to be a regular file and its size checked before a
    byte is read: /dev/zero, a FIFO, a folder, a NUL, an unknown home, an oversized file. If this
    fails, a batch line or --image hangs on a FIFO or reads /dev/zero forever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.png"
    big.write_bytes(bytes(1001))
    cases = {
        "/dev/zero": "not a regular file",
        str(fifo): "not a regular file",
        str(tmp_path): "not a regular file",
        "a\0b.png": "NUL",
        "~nosuchuser-20/x.png": "home folder",
        str(big): "1001 bytes, over the 1000-byte limit",
        str(tmp_path / "missing.png"): "No such file",
    }
    start = time.perf_counter()
    for path, message in cases.items():
        with pytest.raises(ImageError, match=message):
            read_file(path, 1000)
    assert time.perf_counter() - start < 5
    assert read_file(big, 1001) == bytes(1001)


# Peak RSS as VmHWM: getrusage's ru_maxrss survives exec, so a child of pytest would start at pytest's peak.
_PEAK_SCRIPT = """
import sys
from tests.images_util import png_bytes
from wan_spmd.images import decode
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
side, depth, color, channels = (int(a) for a in sys.argv[1:])
data = png_bytes(side, side, depth, color, (bytes(side * channels * depth // 8) for _ in range(side)))
before = peak()
pixels = decode(data, 25_000_000)
print(peak() - before, pixels.width * pixels.height)
"""


@pytest.mark.parametrize("depth, color, channels", [(8, 6, 4), (16, 0, 1)], ids=["RGBA 8-bit", "grey 16-bit"])
def test_decode_memory_is_bounded_by_the_pixels(depth, color, channels):
    """A 25-megapixel PNG (the limit) decodes within 12 bytes of host memory per pixel, measured as
    the peak RSS (VmHWM) growth of a fresh process: the 3-byte RGB answer, the decoded planes, and bands of
    temporaries, never whole-image float64 copies or a second copy of the answer. If this fails, two
    uploads at the limit decoding at once cost gigabytes (issue 33: before, 14 bytes per pixel for
    RGBA and 33 for 16-bit grey)."""
    import subprocess
    import sys

    from tests.conftest import ROOT, cli_env

    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, "5000", str(depth), str(color), str(channels)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown, pixels = (int(v) for v in proc.stdout.split())
    print(f"peak RSS growth {grown / 2**20:.0f} MiB, {grown / pixels:.1f} bytes per pixel")
    assert pixels == 25_000_000 and grown < 12 * pixels, f"{grown / pixels:.1f} bytes per pixel"
