"""Wan2.2 model families as data, without torch.

A model folder is matched to its family by what its files say about the architecture (a second
expert, `expand_timesteps`, the VAE's latent channels), never by `_class_name`: the official
TI2V-5B folder declares `WanPipeline`, as T2V-A14B does. Every module that needs a fact about a
family (folder checks, request validation, the tiny builder, the loader, the pipeline) reads it
here instead of testing a class name or assuming two experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Conditioning = Literal["none", "channel_concat", "first_frame"]
"""How an image conditions the video: not at all (T2V); its VAE latent and a first-frame mask
concatenated to the noise on the channel dimension (I2V-A14B); its latent replacing the first latent
frame, kept clean by per-token timesteps (TI2V-5B)."""
ImagePolicy = Literal["required", "optional", "refused"]
ImageSizing = Literal["sqrt_area", "best_fit"]
"""How a request with an image and no size gets its size from the image's aspect within `max_area`:
each side from sqrt(area x aspect) rounded down (the official A14B `image2video.py`), or the
official TI2V `best_output_size` (round one side down, fit the other in the area, keep the pair
whose aspect is closer to the image's)."""


@dataclass(frozen=True)
class Family:
    """One row of the table: what a Wan2.2 checkpoint of this family is."""

    name: str
    """Also the name of its built-in preset, `configs/<name>.toml`."""
    experts: int
    """1, or 2 (`transformer` above the boundary timestep, `transformer_2` below)."""
    vae_z_dim: int
    """Latent channels of the VAE (16 for the Wan2.1 VAE, 48 for the Wan2.2 VAE)."""
    vae_stride_spatial: int
    """Pixels per latent position along height and width."""
    vae_stride_temporal: int
    """Frames per latent frame after the first."""
    conditioning: Conditioning
    image: ImagePolicy
    """Whether a request must, may or must not carry an input image."""
    patch_size: int = 2
    """The transformer's spatial patch: tokens are latent positions / patch_size**2."""
    expand_timesteps: bool = False
    """The timestep is given per token (TI2V), so the conditioned first frame stays clean."""
    pipeline_class: str = "WanPipeline"
    """What diffusers loads the folder as (equivalence tests, folder writer)."""
    default_boundary_ratio: float | None = None
    """The public checkpoint's `boundary_ratio`; None for one expert. A folder's own value wins."""
    image_sizing: ImageSizing = "sqrt_area"
    decode_token_steps: tuple[tuple[int, float], ...] = ()
    """The VAE's share of a job's time (decode, and encode where the image is a video condition), per
    token of the video, in token-steps (`work`), keyed by the transformer's width (heads x head dim):
    the real checkpoint's, and our tiny checkpoint's (48), each calibrated on its own (`work`)."""

    def work(self, transformer_config: Mapping[str, Any], tokens: int, steps: int) -> int:
        """A job's estimated time in token-steps (one token through one denoising step, attention
        aside; the unit of --max-work):

            steps x tokens x (1 + tokens / attention_tokens)  +  decode_token_steps x tokens

        Per token, a block's matrix products cost 6 d^2 + 2 d ffn multiply-adds (self-attention's
        q/k/v/o, cross-attention's q/o, the FFN) and self-attention's two products 2 d tokens, so
        attention costs as much as the rest at attention_tokens = 3 d + ffn (29,184 for A14B): the
        quadratic term. The decode grows with frames x pixels, so with tokens, at a cost per token
        measured per family (table above). The estimate sets the admitted work and the deadline."""
        dim = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
        attention_tokens = 3 * dim + int(transformer_config["ffn_dim"])
        known = dict(self.decode_token_steps)
        # the row for the nearest width (a folder of another size than ours: its closest calibration)
        decode = known[min(known, key=lambda w: abs(w - dim))] if known else 0.0
        return round(steps * tokens * (1 + tokens / attention_tokens) + decode * tokens)

    @property
    def spatial_multiple(self) -> int:
        """Width and height must be multiples of this: VAE stride times the patch size."""
        return self.vae_stride_spatial * self.patch_size

    @property
    def expert_names(self) -> tuple[str, ...]:
        return ("transformer", "transformer_2")[: self.experts]

    @property
    def takes_image(self) -> bool:
        return self.image != "refused"


# The VAE's cost per token in token-steps (Family.decode_token_steps), by transformer width. 5120
# and 3072 (the real checkpoints) are estimates from published timings: a 720p 81-frame Wan2.1-VAE
# decode takes about half an A14B denoising step at that size (I2V encodes its 81-frame condition
# too, as much again), and a Wan2.2-VAE decode about two and a half TI2V-5B steps. 48 (our tiny
# checkpoints) is measured on the CPU, where the tiny VAE dwarfs the tiny transformer
# (tests/unit/test_work_estimate.py checks it).
T2V_VAE_COST = ((5120, 2.0), (48, 300.0))
I2V_VAE_COST = ((5120, 4.0), (48, 500.0))
TI2V_VAE_COST = ((3072, 6.0), (48, 400.0))

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="wan2.2-i2v-a14b",
            experts=2,
            vae_z_dim=16,
            vae_stride_spatial=8,
            vae_stride_temporal=4,
            conditioning="channel_concat",
            image="required",
            pipeline_class="WanImageToVideoPipeline",
            default_boundary_ratio=0.9,
            decode_token_steps=I2V_VAE_COST,
        ),
        Family(
            name="wan2.2-t2v-a14b",
            experts=2,
            vae_z_dim=16,
            vae_stride_spatial=8,
            vae_stride_temporal=4,
            conditioning="none",
            image="refused",
            default_boundary_ratio=0.875,
            decode_token_steps=T2V_VAE_COST,
        ),
        # Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py: vae_stride (4, 16, 16), patch (1, 2, 2);
        # diffusers' scripts/convert_wan_to_diffusers.py: in/out channels 48, one transformer,
        # WanPipeline(expand_timesteps=True); wan/textimage2video.py sizes from the image by
        # best_output_size and runs text-only without one.
        Family(
            name="wan2.2-ti2v-5b",
            experts=1,
            vae_z_dim=48,
            vae_stride_spatial=16,
            vae_stride_temporal=4,
            conditioning="first_frame",
            image="optional",
            expand_timesteps=True,
            image_sizing="best_fit",
            decode_token_steps=TI2V_VAE_COST,
        ),
    )
}


class UnknownFamily(ValueError):
    """The folder's facts match no row of the table (one line, says which facts were seen)."""


def match_family(
    index: Mapping[str, Any], transformer_config: Mapping[str, Any], vae_config: Mapping[str, Any], has_expert_2: bool
) -> Family:
    """The family whose facts a model folder shows.

    `index` is model_index.json, `has_expert_2` whether a `transformer_2` component is declared and
    present. Two experts are A14B: the transformer's input channels say I2V (noise + mask + image
    latent, 16 + 4 + 16 = 36) or T2V (16). One expert with `expand_timesteps` and a 48-channel VAE
    is TI2V-5B.
    """
    z_dim = int(vae_config.get("z_dim", 16))
    in_channels = int(transformer_config.get("in_channels", z_dim))
    expand = bool(index.get("expand_timesteps", False))
    facts = (
        f"experts={2 if has_expert_2 else 1}, expand_timesteps={expand}, vae z_dim={z_dim}, in_channels={in_channels}"
    )
    for family in FAMILIES.values():
        if (family.experts == 2) != has_expert_2 or family.expand_timesteps != expand or family.vae_z_dim != z_dim:
            continue
        concat = family.conditioning == "channel_concat"
        if in_channels == (2 * z_dim + 4 if concat else z_dim):
            return family
    raise UnknownFamily(f"no Wan2.2 family matches this folder ({facts})")
