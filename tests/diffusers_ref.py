"""diffusers' own I2V pipeline on our components: the reference of the LoRA and scheduler tests."""

from __future__ import annotations

import torch
from diffusers import WanImageToVideoPipeline


def i2v_reference_latents(comps, params, scheduler=None) -> torch.Tensor:
    """Final latents of `WanImageToVideoPipeline.__call__` for `params` on `comps`, with the folder's
    scheduler (at the request's flow_shift) unless another is given."""
    if scheduler is None:
        scheduler = type(comps.scheduler).from_config(comps.scheduler.config, flow_shift=params.flow_shift)
    pipe = WanImageToVideoPipeline(
        tokenizer=comps.tokenizer,
        text_encoder=comps.text_encoder,
        vae=comps.vae,
        scheduler=scheduler,
        transformer=comps.transformer,
        transformer_2=comps.transformer_2,
        boundary_ratio=params.boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        image=params.image.to_pil(),
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        guidance_scale_2=params.guidance_scale_2,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="latent",
    ).frames
