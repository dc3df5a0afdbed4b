"""The decode seam and the streamed writer: chunked decoding, the mp4 it streams, a bf16 VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import EXAMPLE_IMAGE
from wan_spmd.config import generation_defaults, inspect_model_folder
from wan_spmd.deliver import deliver
from wan_spmd.models import Dtypes, load_components
from wan_spmd.params import resolve_params
from wan_spmd.pipeline import WanVideoPipeline
from wan_spmd.video import probe_mp4, write_mp4

BF16_VAE_MIN_PSNR_DB = 40.0
BF16_VAE_MAX_MEAN_STEPS = 1.5
"""Measured on the tiny model (random weights: indicative only): a bf16 VAE's 8-bit frames are
43.9-45.3 dB PSNR from fp32's, 0.71-0.85 steps apart on average, with a heavy tail (under 0.6% of
values more than 8 steps off, the worst 48)."""


@pytest.fixture(scope="module")
def made(tiny_i2v):
    info = inspect_model_folder(tiny_i2v)
    params = resolve_params(
        {"prompt": "a kite", "seed": 3, "num_frames": 17},
        info=info,
        defaults=generation_defaults(info),
        image=EXAMPLE_IMAGE.read_bytes(),
    )
    pipe = WanVideoPipeline(load_components(info, torch.device("cpu")), info, torch.device("cpu"))
    return info, params, pipe, pipe.generate_latents(params)


def test_chunks_are_the_whole_decode_split(made):
    """If this fails, decoding in chunks (what streams into the encoder) changed the frames: the
    causal cache was reset between chunks, or post-processing differs from diffusers' whole decode."""
    _, params, pipe, state = made
    chunks = [c.clone() for c in pipe.decode_chunks(state.latents)]
    assert [len(c) for c in chunks] == [13, 4]  # 5 latent frames: 1 + 4x3 video frames, then 4
    vae = pipe.c.vae
    whole = vae.decode(state.latents / pipe.inv_latents_std + pipe.latents_mean, return_dict=False)[0]
    whole = ((whole / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8)
    assert torch.equal(torch.cat(chunks), whole)
    assert whole.float().std() > 2


def test_streamed_mp4_equals_the_one_written_at_once(made, tmp_path):
    """If this fails, frames streamed chunk by chunk into ffmpeg (while the VAE decodes) make another
    video than the same frames written in one piece."""
    _, params, pipe, state = made
    streamed, timings = deliver(pipe.decode_chunks(state.latents), tmp_path / "s.mp4", params, tmp_path / "png")
    frames = torch.cat(list(pipe.decode_chunks(state.latents))).numpy()
    whole = write_mp4(frames, tmp_path / "w.mp4", params.fps)
    assert streamed.read_bytes() == whole.read_bytes()
    assert probe_mp4(streamed)["num_frames"] == params.num_frames == len(list((tmp_path / "png").glob("*.png")))
    assert timings["Mp4Encoding"] >= 0


def test_bf16_vae_frames_are_close_to_fp32(made, tiny_i2v):
    """--vae-dtype bf16 decodes within the stated PSNR and mean of fp32 on the tiny model; if this
    fails, the bf16 path casts wrongly (a wrong scale or a dtype mix-up would be far off)."""
    info, params, _, state = made
    pipe16 = WanVideoPipeline(
        load_components(info, torch.device("cpu"), Dtypes.for_device(torch.device("cpu"), vae="bf16")),
        info,
        torch.device("cpu"),
    )
    assert pipe16.c.vae.dtype == torch.bfloat16
    ref = torch.cat(list(made[2].decode_chunks(state.latents))).double()
    got = torch.cat(list(pipe16.decode_chunks(state.latents))).double()
    psnr = 10 * np.log10(255**2 / ((ref - got) ** 2).mean().item())
    assert psnr >= BF16_VAE_MIN_PSNR_DB
    assert (ref - got).abs().mean().item() <= BF16_VAE_MAX_MEAN_STEPS
    assert got.std() > 2
