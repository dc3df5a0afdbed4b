"""The one request schema: defaults, derivations and the errors every front shares."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from wan_spmd.config import REAL_MODELS, ModelInfo
from wan_spmd.params import Limits, RequestError, best_fit_size, derive_num_frames, resolve_params, size_from_area

I2V = REAL_MODELS["wan2.2-i2v-a14b"]
T2V = REAL_MODELS["wan2.2-t2v-a14b"]
TI2V = REAL_MODELS["wan2.2-ti2v-5b"]
DEFAULTS = {
    "num_inference_steps": 40,
    "flow_shift": 5.0,
    "guidance_scale": 3.5,
    "guidance_scale_2": 3.5,
    "num_frames": 81,
    "fps": 16,
    "max_area": "1280x720",
    "size": "1280x720",
}


def png(width: int = 320, height: int = 192) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def resolve(request: dict, info: ModelInfo = T2V, image: bytes | None = None, **kw):
    return resolve_params(request, info=info, defaults=DEFAULTS, image=image, **kw)


def test_defaults_fill_in_and_model_boundary_is_used():
    """A bare prompt gets the config's settings and the folder's boundary_ratio."""
    p = resolve({"prompt": "a cat"})
    assert (p.width, p.height, p.num_frames, p.fps, p.num_inference_steps) == (1280, 720, 81, 16, 40)
    assert p.boundary_ratio == 0.875 and p.guidance_scale == 3.5 and p.image is None
    assert 0 <= p.seed < 2**32


def test_seconds_times_fps_rounds_as_diffusers():
    """5 s at 16 fps is 80 frames, rounded to 81 (n // 4 * 4 + 1), and the rounding is reported."""
    assert derive_num_frames(5, 16) == 81
    assert derive_num_frames(2, 8) == 17
    p = resolve({"prompt": "x", "seconds": "5", "fps": "16"})
    assert p.num_frames == 81 and any("81" in w for w in p.warnings)


def test_num_frames_wins_over_seconds_and_size_over_width_height():
    p = resolve({"prompt": "x", "seconds": 5, "num_frames": 33, "size": "832x480", "width": 64, "height": 64})
    assert (p.num_frames, p.width, p.height) == (33, 832, 480)


def test_i2v_size_follows_image_aspect_within_area():
    """Official Wan2.2 sizing: 320x192 (5:3) within 1280x720 -> 1232x736, multiples of 16."""
    assert size_from_area(320, 192, 1280 * 720) == (1232, 736)
    p = resolve({"prompt": "x"}, info=I2V, image=png(320, 192))
    assert (p.width, p.height) == (1232, 736)
    assert p.width % 16 == 0 and p.height % 16 == 0


def test_unknown_keys_are_named_in_a_warning():
    p = resolve({"prompt": "x", "colour": "red", "style": 1, "model": "m"})
    assert p.warnings and "colour, style" in p.warnings[0] and "model" not in p.warnings[0]


@pytest.mark.parametrize(
    "request_, field",
    [
        ({}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x", "num_frames": 80}, "num_frames"),
        ({"prompt": "x", "num_frames": "abc"}, "num_frames"),
        ({"prompt": "x", "num_frames": 165}, "num_frames"),
        ({"prompt": "x", "seconds": 30}, "seconds"),
        ({"prompt": "x", "size": "1280*720"}, "size"),
        ({"prompt": "x", "size": "1000x720"}, "size"),
        ({"prompt": "x", "size": "2048x720"}, "size"),
        ({"prompt": "x", "width": 640}, "height"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 201}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": "nan"}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale_2": "inf"}, "guidance_scale_2"),
        ({"prompt": "x", "boundary_ratio": 1.5}, "boundary_ratio"),
        ({"prompt": "x", "flow_shift": 0}, "flow_shift"),
        ({"prompt": "x", "seed": -3}, "seed"),
        ({"prompt": "x", "fps": 0}, "fps"),
    ],
)
def test_invalid_values_name_their_field(request_, field):
    """Each invalid value is refused with its field named, never silently corrected."""
    with pytest.raises(RequestError) as err:
        resolve(request_)
    assert err.value.field == field, str(err.value)


def test_image_rules():
    """I2V needs a decodable image; T2V refuses one; truncated and oversized uploads fail."""
    with pytest.raises(RequestError, match="image-to-video"):
        resolve({"prompt": "x"}, info=I2V)
    with pytest.raises(RequestError, match="text-to-video"):
        resolve({"prompt": "x"}, image=png())
    with pytest.raises(RequestError, match="not a readable image"):
        resolve({"prompt": "x"}, info=I2V, image=b"GIF89a not really")
    with pytest.raises(RequestError, match="not a readable image"):
        resolve({"prompt": "x"}, info=I2V, image=png()[:60])
    with pytest.raises(RequestError, match="empty"):
        resolve({"prompt": "x"}, info=I2V, image=b"")
    with pytest.raises(RequestError, match="over the"):
        resolve({"prompt": "x"}, info=I2V, image=png(), limits=Limits(max_upload_bytes=10))


def test_limits_are_flags_not_constants():
    p = resolve({"prompt": "x", "size": "2048x720"}, limits=Limits(max_width=2048, max_work=50_000_000))
    assert p.width == 2048


def test_ti2v_image_is_optional_and_sized_as_the_official_ti2v():
    """TI2V takes a prompt alone (the preset size) or with an image, whose size then follows the
    official `best_output_size` within 1280x704 in multiples of 32: 320x192 -> 1216x736 (the
    A14B rule would give 1216x736 too, but 512x512 -> 960x928, not 928x928)."""
    ti2v_defaults = {**DEFAULTS, "size": "1280x704", "max_area": "1280x704", "num_frames": 121, "fps": 24}
    text = resolve_params({"prompt": "x"}, info=TI2V, defaults=ti2v_defaults)
    assert (text.width, text.height, text.num_frames, text.image, text.boundary_ratio) == (1280, 704, 121, None, None)
    assert best_fit_size(320, 192, 1280 * 704) == (1216, 736)
    assert best_fit_size(512, 512, 1280 * 704) == (960, 928)
    assert size_from_area(512, 512, 1280 * 704, 32) == (928, 928)
    assert best_fit_size(704, 1280, 1280 * 704) == (704, 1280)
    square = resolve_params({"prompt": "x"}, info=TI2V, defaults=ti2v_defaults, image=png(512, 512))
    assert (square.width, square.height) == (960, 928) and "follows the image" in square.warnings[0]
    # an explicit size wins over the image's aspect (the image is then resized to it)
    sized = resolve_params({"prompt": "x", "size": "704x1280"}, info=TI2V, defaults=ti2v_defaults, image=png())
    assert (sized.width, sized.height) == (704, 1280)


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"size": "1280x720"}, "height 720 must be a positive multiple of 32"),
        ({"width": 1296, "height": 704}, "width 1296 must be a positive multiple of 32"),
        ({"num_frames": 120, "size": "1280x704"}, "num_frames 120 must be 4k+1"),
    ],
)
def test_ti2v_refuses_sizes_off_32_and_frames_off_4k_plus_1(request_, message):
    """TI2V's VAE (16x) and patch (2x) need multiples of 32: 720p is 1280x704 here, and 1280x720
    (fine for A14B) is an error naming the number, as is a frame count that is not 4k+1."""
    with pytest.raises(RequestError, match=re.escape(message)):
        resolve({"prompt": "x", **request_}, info=TI2V)
    assert resolve({"prompt": "x", "size": "1280x720"}, info=T2V).height == 720


def test_model_limits_come_from_the_rotary_table(tiny_i2v, tiny_ti2v):
    """A model takes at most `rope_max_seq_len` latent positions per axis (diffusers precomputes that
    many rotary angles), on every family: the tiny models' 32 give 512 px (A14B-style, 16 px a
    position) or 1024 px (TI2V, 32) and 125 frames; the real ones are bound by the flags alone.
    Past it is a 400 naming the model's limit. If this fails, such a request passes validation and
    fails inside the first forward (a 500 after the work began)."""
    from wan_spmd.config import inspect_model_folder
    from wan_spmd.params import model_limits

    tiny, tiny_5b = inspect_model_folder(tiny_i2v), inspect_model_folder(tiny_ti2v)
    assert model_limits(tiny) == model_limits(tiny, Limits()) and model_limits(tiny).max_width == 512
    assert (model_limits(tiny).max_frames, model_limits(tiny_5b).max_width, model_limits(tiny_5b).multiple) == (
        125,
        1024,
        32,
    )
    assert (model_limits(I2V).max_width, model_limits(TI2V).max_frames) == (1920, 161)
    with pytest.raises(RequestError, match="over this model's limit 512") as over:
        resolve_params({"prompt": "x", "size": "528x48"}, info=tiny, defaults=DEFAULTS, image=png())
    assert over.value.field == "size"
    with pytest.raises(RequestError, match="over this model's limit 125"):
        resolve_params({"prompt": "x", "size": "64x48", "num_frames": 129}, info=tiny, defaults=DEFAULTS, image=png())
    with pytest.raises(RequestError, match="over the limit 1920"):
        resolve({"prompt": "x", "size": "1936x720"})


def test_round_to_model_rounds_as_diffusers_and_reports_it():
    """The HTTP front's lenient mode rounds each side down to the model's multiple and frames to
    n // 4 * 4 + 1, reporting both (warnings, `adjusted`); without it (the CLI, JSONL, a strict
    request) the same values are errors; a side under the multiple is an error either way."""
    p = resolve({"prompt": "x", "size": "854x480", "num_frames": 80}, round_to_model=True)
    assert (p.size, p.num_frames) == ("848x480", 81)
    assert p.adjusted == (("size", "854x480", "848x480"), ("num_frames", "80", "81"))
    assert any("rounded down to 848x480" in w for w in p.warnings)
    p = resolve({"prompt": "x", "width": 1290, "height": 730}, info=TI2V, round_to_model=True)
    assert (p.size, p.adjusted[0][0]) == ("1280x704", "width")
    assert resolve({"prompt": "x", "size": "848x480", "num_frames": 81}, round_to_model=True).adjusted == ()
    for request in ({"size": "854x480"}, {"num_frames": 80}):
        with pytest.raises(RequestError):
            resolve({"prompt": "x", **request})
    with pytest.raises(RequestError, match="positive multiple of 16"):
        resolve({"prompt": "x", "size": "8x480"}, round_to_model=True)
