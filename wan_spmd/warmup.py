"""Warm-up that compiles and nothing more: the transformer forwards a request of each warm-up shape
will make, on random inputs of the right shapes and dtypes.

What a compiled block's graph depends on is the shapes and dtypes of what reaches the blocks and
the token group that splits them (`parallel.expert.ParallelExpert`); the prompt, the image, the
timestep's value and the guidance scale do not reach them. So per warm-up shape, per expert:
- one forward split over the layout's usual token group (each CFG branch runs exactly this shape:
  serially both on every rank, or under CFG-parallel one per rank group);
- one forward split over the wide group where the expert has one (guidance-off requests under
  CFG-parallel).
Text encoding, the VAE (not compiled) and scheduler steps are left out: they compile nothing.
Every rank runs the same forwards in the same order, since the blocks hold collectives.

torch's automatic dynamic shapes do the rest (`compiling`): the first shape compiles a static
graph per token group, a second one the dynamic graph that then serves every later size.
"""

from __future__ import annotations

import logging
import time

import torch

from wan_spmd.launch import WarmupShape
from wan_spmd.pipeline import MAX_SEQUENCE_LENGTH, WanVideoPipeline

log = logging.getLogger("wan_spmd")


def warmup_forwards(pipe: WanVideoPipeline, shape: WarmupShape) -> int:
    """Run the forwards a request of `shape` (width, height, frames) makes on this rank; returns how
    many ran."""
    width, height, frames = shape
    dtype, device = pipe.transformer_dtype, pipe.device
    latent_frames = (frames - 1) // pipe.vae_scale_temporal + 1
    lat_h, lat_w = height // pipe.vae_scale_spatial, width // pipe.vae_scale_spatial
    generator = torch.Generator("cpu").manual_seed(0)
    runs = 0
    with torch.inference_mode():
        for index, (model, expert) in enumerate(zip(pipe.c.experts, pipe.experts, strict=True)):
            if pipe.placement is not None:  # an offloaded expert comes onto the device as for a step
                pipe.placement.use_expert(index)
            config = model.config
            # (1, in_channels, T_lat, h, w): latents and, for I2V, the concatenated condition
            hidden = torch.randn(1, config.in_channels, latent_frames, lat_h, lat_w, generator=generator)
            hidden = hidden.to(device, dtype)
            text = torch.randn(1, MAX_SEQUENCE_LENGTH, config.text_dim, generator=generator).to(device, dtype)
            t = torch.tensor(999, device=device)  # int64, as UniPC's timesteps
            if pipe.info.family.expand_timesteps:  # TI2V: (1, tokens), one per patch
                latents = torch.empty(1, 1, latent_frames, lat_h, lat_w, device=device)
                timestep = pipe.token_timesteps(pipe.denoise_mask(latents, None), t, 1)
            else:
                timestep = t.expand(1)
            expert(hidden, timestep, text)
            runs += 1
            if getattr(expert, "can_widen", False):
                expert(hidden, timestep, text, wide=True)
                runs += 1
        if pipe.placement is not None:
            pipe.placement.denoised()
    return runs


def warm_up(pipe: WanVideoPipeline, shapes: tuple[WarmupShape, ...]) -> float:
    """`warmup_forwards` for each shape, so compiles and autotuning are paid before the ranks agree
    they are ready; returns the seconds it took."""
    start = time.perf_counter()
    for shape in shapes:
        step = time.perf_counter()
        runs = warmup_forwards(pipe, shape)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        log.info("warmed up %dx%dx%d (%d forward(s), %.1f s)", *shape, runs, time.perf_counter() - step)
    return time.perf_counter() - start
