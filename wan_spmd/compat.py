"""Every use of a private diffusers name, in one place, with the diffusers versions it was tested on.

diffusers keeps these names private, so a minor release may move them; pyproject pins diffusers to
`TESTED_DIFFUSERS`, and a new release is checked against the tests of the callers named below
before the pin moves.
"""

from __future__ import annotations

from typing import Any

import torch

TESTED_DIFFUSERS = ">=0.42.1,<0.43"


def decode_latent_frame(vae: Any, x: torch.Tensor, first: bool) -> torch.Tensor:
    """One latent frame through `AutoencoderKLWan`'s decoder with its causal feature cache, as its
    private `_decode` loop does (`_feat_map`, `_conv_idx`); `vae.clear_cache()` before the first
    frame and after the last. Used by `pipeline.decode_chunks` to stream chunks of frames."""
    vae._conv_idx = [0]
    return vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=first)


def unpatchify(video: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Wan2.2-5B's VAE output unpatchified (a helper of diffusers' VAE module, not exported)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify as _unpatchify

    return _unpatchify(video, patch_size=patch_size)


def causal_conv_padding(conv: Any) -> tuple[int, int, int, int, int, int]:
    """A `WanCausalConv3d`'s private `_padding`: (W, W, H, H, T-before, T-after), its own padding
    being (0, 0, 0). Used by the row-split VAE (`parallel/vae.py`)."""
    return tuple(conv._padding)


def convert_wan_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' converter of original Wan / ComfyUI LoRA keys to its own names (private in
    `lora_conversion_utils`). Used by `lora.py`."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    return _convert_non_diffusers_wan_lora_to_diffusers(state_dict)
