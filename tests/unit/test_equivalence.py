"""Our pipeline against diffusers' own WanImageToVideoPipeline / WanPipeline on the tiny weights.

If these fail, wan_spmd's videos differ from what diffusers makes from the same weights and seed:
a wrong expert switch, a CFG rule, prompt cleaning, noise drawing, I2V conditioning or decoding.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image

from tests.conftest import EXAMPLE_IMAGE
from wan_spmd.config import generation_defaults, inspect_model_folder
from wan_spmd.models import load_components
from wan_spmd.params import resolve_params
from wan_spmd.pipeline import WanVideoPipeline

TOLERANCE = 1e-4  # max abs diff in [0, 1] pixel space (float32 rounding)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "variant, request_",
    [
        ("i2v", {"guidance_scale": 3.5, "guidance_scale_2": 2.0, "seed": 7}),  # CFG, both experts
        ("i2v", {"guidance_scale": 1.0, "guidance_scale_2": 5.0, "seed": 8}),  # guidance off (quirk: both)
        ("t2v", {"guidance_scale": 4.0, "guidance_scale_2": 3.0, "seed": 9, "size": "48x32"}),
        ("t2v", {"guidance_scale": 0.5, "seed": 10, "num_frames": 5}),
    ],
)
def test_matches_diffusers(variant, request_, request):
    folder = request.getfixturevalue(f"tiny_{variant}")
    info = inspect_model_folder(folder)
    comps = load_components(info, torch.device("cpu"))
    image = EXAMPLE_IMAGE.read_bytes() if info.family.takes_image else None
    params = resolve_params(
        {"prompt": "A cat &amp; a   dog\n play", **request_}, info=info, defaults=generation_defaults(info), image=image
    )
    high, low = count_calls(comps.transformer), count_calls(comps.transformer_2)
    ours = WanVideoPipeline(comps, info, torch.device("cpu"))(params)
    passes = 2 if params.guidance_scale > 1 else 1  # CFG for both experts only when guidance_scale > 1
    sched = type(comps.scheduler).from_config(comps.scheduler.config, flow_shift=params.flow_shift)
    sched.set_timesteps(params.num_inference_steps)
    high_steps = int((sched.timesteps >= params.boundary_ratio * 1000).sum())
    assert 0 < high_steps < params.num_inference_steps  # both experts run
    assert (high[0], low[0]) == (high_steps * passes, (params.num_inference_steps - high_steps) * passes)

    scheduler = type(comps.scheduler).from_config(comps.scheduler.config, flow_shift=params.flow_shift)
    cls = WanImageToVideoPipeline if info.family.takes_image else WanPipeline
    pipe = cls(
        tokenizer=comps.tokenizer,
        text_encoder=comps.text_encoder,
        vae=comps.vae,
        scheduler=scheduler,
        transformer=comps.transformer,
        transformer_2=comps.transformer_2,
        boundary_ratio=params.boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        guidance_scale_2=params.guidance_scale_2,
    )
    if info.family.takes_image:
        kwargs["image"] = Image.open(io.BytesIO(image)).convert("RGB")
    latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(params.seed), output_type="latent").frames
    video = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(params.seed), output_type="np").frames[0]

    assert latents.shape == ours.latents.shape
    assert (latents - ours.latents).abs().max().item() <= TOLERANCE
    # Our frames come out of the chunked, streamed decode as 8 bits: diffusers' float video rounded
    # (at most half a step away), so the chunking changes nothing
    ours_video = ours.frames.numpy().astype(np.float64) / 255  # (F, H, W, C) like diffusers' np output
    assert video.shape == ours_video.shape == (params.num_frames, params.height, params.width, 3)
    assert np.abs(video - ours_video).max() <= 0.5 / 255 + TOLERANCE
    assert video.std() > 0.01  # not a constant frame that would match anything


@pytest.mark.parametrize(
    "with_image, request_",
    [
        (True, {"guidance_scale": 5.0, "seed": 7}),  # size from the image (320x192) within 64x64
        (True, {"guidance_scale": 1.0, "seed": 8, "size": "32x64", "num_frames": 5}),  # image resized
        (False, {"guidance_scale": 5.0, "seed": 9}),
        (False, {"guidance_scale": 1.0, "seed": 10, "size": "64x32", "num_frames": 5}),
    ],
)
def test_ti2v_matches_diffusers(tiny_ti2v, with_image, request_):
    """TI2V-5B against diffusers' `WanPipeline` (no image) and `WanImageToVideoPipeline` (image), both
    with `expand_timesteps=True`. If this fails, the per-token timesteps, the first-frame latent (its
    encoding, its replacement in the model input and after the last step) or the Wan2.2 VAE's
    patchified decode differ from diffusers'."""
    info = inspect_model_folder(tiny_ti2v)
    assert info.family.name == "wan2.2-ti2v-5b"
    comps = load_components(info, torch.device("cpu"))
    image = EXAMPLE_IMAGE.read_bytes() if with_image else None
    params = resolve_params(
        {"prompt": "A cat &amp; a   dog\n play", **request_}, info=info, defaults=generation_defaults(info), image=image
    )
    timestep_shapes = []
    comps.transformer.register_forward_pre_hook(
        lambda m, a, k: timestep_shapes.append(tuple(k["timestep"].shape)), with_kwargs=True
    )
    ours_pipe = WanVideoPipeline(comps, info, torch.device("cpu"))
    ours = ours_pipe(params)
    lat_t, lat_h, lat_w = ours.latents.shape[2:]
    tokens = lat_t * (lat_h // 2) * (lat_w // 2)
    passes = 2 if params.guidance_scale > 1 else 1
    assert timestep_shapes == [(1, tokens)] * (params.num_inference_steps * passes)  # one timestep per token

    scheduler = type(comps.scheduler).from_config(comps.scheduler.config, flow_shift=params.flow_shift)
    common = dict(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, vae=comps.vae, scheduler=scheduler)
    if with_image:
        pipe = WanImageToVideoPipeline(**common, transformer=comps.transformer, expand_timesteps=True)
    else:
        pipe = WanPipeline(**common, transformer=comps.transformer, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
    )
    if with_image:
        kwargs["image"] = Image.open(io.BytesIO(image)).convert("RGB")
    latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(params.seed), output_type="latent").frames
    video = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(params.seed), output_type="np").frames[0]

    assert latents.shape == ours.latents.shape == (1, 48, lat_t, params.height // 16, params.width // 16)
    assert (latents - ours.latents).abs().max().item() <= TOLERANCE
    if with_image:  # the first latent frame is exactly the image's, whatever the steps did
        assert torch.equal(ours.latents[:, :, :1], ours_pipe.first_frame_latent(params))
    ours_video = ours.frames.numpy().astype(np.float64) / 255
    assert video.shape == ours_video.shape == (params.num_frames, params.height, params.width, 3)
    assert np.abs(video - ours_video).max() <= 0.5 / 255 + TOLERANCE
    assert video.std() > 0.01
