"""Hostile request values (issue 20): every value a client can send ends in a RequestError naming
its field, or in a bounded request; never another exception, never unbounded work."""

from __future__ import annotations

import json
import pickle
import random
import time

import pytest

from tests.unit.test_params import DEFAULTS, I2V, T2V, png, resolve
from wan_spmd.params import FIELDS, Limits, RequestError, resolve_params, token_count


@pytest.mark.parametrize(
    ("request_", "field", "message"),
    [
        ({"size": "²x720"}, "size", "WIDTHxHEIGHT"),  # str.isdigit() accepts it, int() does not
        ({"size": "١٢٨٠x720"}, "size", "WIDTHxHEIGHT"),  # int() accepts Arabic-Indic digits
        ({"size": "1_280x720"}, "size", "WIDTHxHEIGHT"),
        ({"width": "１２８０", "height": "720"}, "width", "ASCII digits"),
        ({"num_frames": "8" * 5000}, "num_frames", "ASCII digits"),  # int() refuses past 4300 digits
        ({"seed": 10**5000}, "seed", "out of range"),
        ({"width": 10**5000, "height": 720}, "width", "out of range"),
        ({"seconds": 1e308}, "seconds", "at most 3600"),  # x fps overflowed to inf, int(inf) raised
        ({"seconds": "1e308"}, "seconds", "at most 3600"),
        ({"guidance_scale": 10**400}, "guidance_scale", "finite"),  # float() overflowed
        ({"guidance_scale": "1e400"}, "guidance_scale", "finite"),
        ({"flow_shift": 1e300}, "flow_shift", "at most 100"),
        ({"guidance_scale": [1]}, "guidance_scale", "must be a number"),
        ({"boundary_ratio": {"a": 1}}, "boundary_ratio", "must be a number"),
        ({"fps": "１６"}, "fps", "ASCII digits"),
        ({"prompt": "a \ud800 cat"}, "prompt", "not valid Unicode"),  # a lone surrogate from JSON
        ({"negative_prompt": "\udfff"}, "negative_prompt", "not valid Unicode"),
        ({"prompt": "x" * 10_001}, "prompt", "10001 characters, over the limit 10000"),
        ({"size": "1920x1920", "num_frames": 161, "num_inference_steps": 200}, "num_inference_steps", "--max-work"),
    ],
)
def test_hostile_values_are_request_errors(request_, field, message):
    """Each value that raised an unexpected exception (or admitted unbounded work) on main is now a
    RequestError naming its field, raised within a second: if this fails, the HTTP answer is a 500,
    the CLI prints a traceback, or the GPUs are held for hours."""
    start = time.perf_counter()
    with pytest.raises(RequestError, match=message) as err:
        resolve({"prompt": "x", **request_})
    assert err.value.field == field and time.perf_counter() - start < 1.0
    str(err.value).encode("utf-8")  # the message itself is always encodable (no lone surrogate)


def test_unknown_keys_warning_is_bounded():
    """A million unknown keys (one a lone surrogate) give one warning under 1 KB naming ten of them;
    if this fails, the answer and the log carry megabytes (9.5 MiB on main) or cannot be encoded."""
    request = {"prompt": "x", "\ud800bad": 1, **{f"key{i}": i for i in range(1_000_000)}}
    p = resolve(request)
    (warning,) = p.warnings
    assert len(warning.encode("utf-8")) < 1024 and warning.endswith("and 999991 more")
    assert "\\ud800bad" in warning and "key0" in warning
    json.dumps(p.summary(), ensure_ascii=False).encode("utf-8")


def test_work_bound_admits_the_presets_largest_request():
    """--max-work's default admits the presets' largest request (A14B 1280x720x81 at 40 steps: 75,600
    tokens) and the same up to 54 steps, and refuses 55; the deadline grows with the work, which
    counts attention's quadratic term and the VAE. If this fails, the default refuses the presets or
    admits hours of GPU time."""
    for info in (I2V, T2V):
        assert token_count(info, 1280, 720, 81) == 21 * 45 * 80
    limits = Limits()
    p = resolve({"prompt": "x", "size": "1280x720", "num_frames": 81, "num_inference_steps": 54})
    attention_tokens = 3 * 5120 + 13824
    assert p.work == round(54 * 75_600 * (1 + 75_600 / attention_tokens) + 2.0 * 75_600) <= limits.max_work
    assert p.deadline_s == pytest.approx(limits.deadline_s_at_max_work * p.work / limits.max_work)
    with pytest.raises(RequestError, match="15080335 token-steps"):
        resolve({"prompt": "x", "size": "1280x720", "num_frames": 81, "num_inference_steps": 55})
    small = resolve({"prompt": "x", "size": "32x32", "num_frames": 5, "num_inference_steps": 1})
    assert small.work < limits.max_work // 10
    assert small.deadline_s == pytest.approx(limits.deadline_s_at_max_work * 0.1)


def test_params_carry_pixels_not_the_file():
    """The job carries decoded pixels (rank 0 decodes once; the other ranks never see the file): its
    pickle is the RGB bytes plus a little, and the pipeline's PIL image is made without decoding."""
    p = resolve({"prompt": "x"}, info=I2V, image=png(320, 192))
    assert (p.image.width, p.image.height) == (320, 192) and p.image.to_pil().getpixel((0, 0)) == (10, 20, 30)
    assert 320 * 192 * 3 < len(pickle.dumps(p)) < 320 * 192 * 3 + 4096
    assert p.summary()["image"] == "<320x192 image>"


def test_random_values_never_raise_anything_else():
    """3000 requests of random values (text of random code points, huge and odd numbers, nested
    containers) for every field: a RequestError or valid params, nothing else, in bounded time."""
    rng = random.Random(20)
    pool = [
        None, True, 0, -1, 10**20, -(10**400), 1e308, -1e308, float("nan"), float("inf"), 0.5, "", " ",
        "x", "1e999", "0x10", "²", "1_0", "nan", "-0", "16", "81", "32x32", "x32", "32x", "9" * 50, [], {}, [1],
        {"a": [1]}, "\ud800", "\0", "٣", "1280x720x1",
    ]  # fmt: skip
    start = time.perf_counter()
    for _ in range(3000):
        request = {"prompt": rng.choice(["x", "\udc80", 5, None, "y" * 20])}
        for f in rng.sample(FIELDS, rng.randint(1, 5)):
            value = rng.choice(pool)
            if rng.random() < 0.3:
                value = "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(1, 6)))
            request[f.name] = value
        try:
            resolve_params(request, info=rng.choice([I2V, T2V]), defaults=DEFAULTS, image=None)
        except RequestError as exc:
            str(exc).encode("utf-8")
    assert time.perf_counter() - start < 30
