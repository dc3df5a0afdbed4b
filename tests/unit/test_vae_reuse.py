"""The I2V condition's encode with exact reuse (`vae_reuse`) against diffusers' full encode."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from wan_spmd.families import FAMILIES
from wan_spmd.tiny import tiny_vae_config
from wan_spmd.vae_reuse import EncodeStats, bits_equal, encode_mode, reuse_encode_mode


def condition_video(height: int, width: int, frames: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """(1, 3, F, H, W): a random image in [-1, 1], then black (zero) frames, as image_condition makes it."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 1, height, width, generator=g) * 2 - 1
    return torch.cat([image, torch.zeros(1, 3, frames - 1, height, width)], dim=2).to(dtype)


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**tiny_vae_config(FAMILIES["wan2.2-i2v-a14b"])).eval()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(bits_equal(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("height", "width", "frames"), [(16, 16, 81), (32, 48, 33), (48, 32, 9)])
def test_reuse_is_bitwise_the_full_encode(tiny_vae, dtype, height, width, frames):
    """If this fails, reusing a stage's previous output changed the condition latents: a stage was
    reused while its input or a cache slot it reads had changed, or the stage loop no longer is
    diffusers' `_encode` (chunking, cache rule, quant_conv, mode)."""
    vae = tiny_vae.to(dtype)
    video = condition_video(height, width, frames, dtype)
    with torch.inference_mode():
        full = vae.encode(video).latent_dist.mode()
        stats = EncodeStats()
        mine = reuse_encode_mode(vae, video, stats=stats)
    assert same_bits(full, mine)
    assert full.float().std() > 0
    chunks = 1 + (frames - 1) // 4
    assert stats.calls == chunks * len(stats.stages)
    if frames >= 17:  # the full-resolution stages repeat from the third zero chunk on
        first = {s.name: s for s in stats.stages}
        assert first["conv_in"].reused == chunks - 3
        assert first["down_blocks.0"].reused >= chunks - 4
        assert stats.held_bytes > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_encode_is_bitwise_diffusers_and_stops_between_chunks(tiny_vae, dtype):
    """`encode_mode` (the default condition encode) is diffusers' encode, bit for bit, and asks
    `between` after every chunk but the last; an exception there ends the encode at that chunk
    (both encoders). If this fails, the chunk loop drifted from diffusers' `_encode`, or a stop
    during the encode waits for the whole encode (issue 33.3)."""
    vae = tiny_vae.to(dtype)
    video = condition_video(32, 48, 21, dtype, seed=3)  # 6 chunks: 1 frame, then 5 x 4
    asked: list[tuple[int, int]] = []
    with torch.inference_mode():
        full = vae.encode(video).latent_dist.mode()
        mine = encode_mode(vae, video, between=lambda done, total: asked.append((done, total)))
    assert same_bits(full, mine) and full.float().std() > 0
    assert asked == [(i, 6) for i in range(1, 6)]

    class Stop(Exception):
        pass

    def stop_at_two(done: int, total: int) -> None:
        asked.append((done, total))
        if done == 2:
            raise Stop

    for encoder in (encode_mode, reuse_encode_mode):
        asked.clear()
        with torch.inference_mode(), pytest.raises(Stop):
            encoder(vae, video, between=stop_at_two)
        assert asked == [(1, 6), (2, 6)], encoder.__name__


def test_a_video_that_never_repeats_is_computed_whole(tiny_vae):
    """If this fails, a stage was reused where its input changed (here every frame is different)."""
    vae = tiny_vae.to(torch.float32)
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 17, 32, 32, generator=g) * 2 - 1
    with torch.inference_mode():
        stats = EncodeStats()
        mine = reuse_encode_mode(vae, video, stats=stats)
        assert same_bits(vae.encode(video).latent_dist.mode(), mine)
    assert stats.reused == 0


def test_reused_run_is_faster_in_work_not_only_equal(tiny_vae):
    """If this fails, the 81-frame condition stops reusing most of its full-resolution work (the
    whole point): measured 18 of 21 conv_in calls and 17 of 21 of the first block's."""
    vae = tiny_vae.to(torch.float32)
    video = condition_video(16, 16, 81, torch.float32)
    with torch.inference_mode():
        stats = EncodeStats()
        reuse_encode_mode(vae, video, stats=stats)
    by_name = {s.name: s.reused for s in stats.stages}
    assert by_name["conv_in"] == 18 and by_name["down_blocks.0"] >= 17
    assert stats.reused / stats.calls > 0.5


def test_bits_not_values():
    """If this fails, equality became float equality: -0.0 would pass for +0.0 (a conv's output can
    differ in the sign of a zero), and a NaN would never match itself."""
    zero = torch.zeros(4)
    assert not bits_equal(zero, -zero)
    nan = torch.full((3,), float("nan"))
    assert bits_equal(nan, nan.clone())
    assert not bits_equal(zero, zero.to(torch.bfloat16))
    assert bits_equal(zero.to(torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16))
