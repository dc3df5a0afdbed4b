"""Our Wan2.2 denoising pipeline, built from diffusers' model classes and scheduler.

It follows `WanImageToVideoPipeline` / `WanPipeline` (diffusers 0.42) step for step so that the
numbers match on the same weights and seed, quirks included:
- prompts are cleaned as diffusers does (ftfy.fix_text, double html.unescape, whitespace collapse),
  tokenised to 512 ids; embeddings past each prompt's length are zeroed;
- classifier-free guidance runs for *both* experts only when `guidance_scale` (the high-noise
  expert's) is > 1, whatever `guidance_scale_2` says;
- the high-noise expert (`transformer`) runs while t >= boundary_ratio * num_train_timesteps, the
  low-noise expert (`transformer_2`) below;
- the initial noise is drawn by a CPU `torch.Generator` seeded with `seed`, in float32, so the
  video depends neither on the device nor on the number of ranks;
- I2V (A14B) conditions on the VAE's latent mode of [image, zeros...] and a first-frame mask;
- TI2V (`expand_timesteps`) gives the timestep per token, t everywhere but 0 on the first latent
  frame when an image conditions it; the model sees that frame replaced by the image's latent mode
  (of the image alone), while the scheduler keeps stepping its own copy, which is replaced once
  more after the last step. Without an image every token gets t and nothing is replaced.

The pipeline is single-device code: it never calls torch.distributed. It calls the objects the
`parallel` package made, without knowing what they do: the `Expert`s (each a `ParallelExpert`
in its layout, or a whole diffusers expert), the `NoisePredictor` (one guided noise prediction per
step: serial CFG here, CFG-parallel there, with `cfg_branch` saying which prompt a rank's group
needs) and the `VaeSplit` (the I2V condition's encode and the chunked decode, `decode_chunks`, split
over the ranks; without one, rank 0 decodes alone). The runtime passes a per-step `StepControl`
that agrees across ranks whether to go on. A `step_cache` (wan_spmd.step_cache), when set, decides
before each step whether the experts' blocks run or reuse their last residual.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

import ftfy
import regex as re
import torch
from diffusers.video_processor import VideoProcessor

from wan_spmd.caches import COUNT_KEYS, LruCache, lookup_counts, pixels_digest, snapshot
from wan_spmd.compat import decode_latent_frame, unpatchify
from wan_spmd.config import ModelInfo
from wan_spmd.jobs import JobCancelled
from wan_spmd.models import Components
from wan_spmd.params import GenerationParams
from wan_spmd.vae_reuse import Between, ConditionEncoder, encode_mode

if TYPE_CHECKING:
    from wan_spmd.step_cache import Agree, StepCache

log = logging.getLogger("wan_spmd")

MAX_SEQUENCE_LENGTH = 512  # UMT5 context; the experts' cross-attention always sees 512 positions


class StepControl(Protocol):
    """Called before each denoising step, between the I2V condition's encoded chunks (`stage`
    "encode") and between decoded chunks (`stage` "decode"), on every rank that runs the loop;
    returns False to stop the job.

    The runtime's implementation agrees across ranks, so all ranks stop at the same step or chunk.
    """

    def __call__(self, step: int, total: int, stage: str = "step") -> bool: ...


class Expert(Protocol):
    """One expert's noise prediction: latents (B, C, T_lat, h, w), timestep (B,) or per token (B, S),
    text embeddings (B, 512, D) -> (B, C_out, T_lat, h, w)."""

    def __call__(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor: ...


class WholeExpert:
    """A diffusers expert called as diffusers' pipelines call it (one device, no layout)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            return_dict=False,
        )[0]


class NoisePredictor(Protocol):
    """One guided noise prediction: the conditional branch and, when `guidance` is not None, the
    unconditional one combined as `uncond + guidance * (cond - uncond)`."""

    def __call__(
        self,
        model: Expert,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor | None,
        negative_embeds: torch.Tensor | None,
        guidance: float | None,
    ) -> torch.Tensor: ...


def serial_cfg(
    model: Expert,
    model_input: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    guidance: float | None,
) -> torch.Tensor:
    """Both branches on these ranks, one after the other, as diffusers runs them."""
    noise_pred = model(model_input, timestep, prompt_embeds)
    if guidance is None:
        return noise_pred
    noise_uncond = model(model_input, timestep, negative_embeds)
    return noise_uncond + guidance * (noise_pred - noise_uncond)


class Placement(Protocol):
    """Where the weights wait between their stages (placement.Offload): the text encoder is on the
    device inside `encoding()`, expert `index` from `use_expert(index)` on, and `denoised()` says
    the last step ran."""

    def encoding(self) -> AbstractContextManager[None]: ...

    def use_expert(self, index: int) -> None: ...

    def denoised(self) -> None: ...


class VaeSplit(Protocol):
    """The VAE's encode and decode split over the ranks (`parallel.vae.RowSplit`)."""

    def encode(self, vae: torch.nn.Module, video: torch.Tensor, between: Between | None = None) -> torch.Tensor:
        """(vae, video (1, 3, F, H, W)) -> the latent mode (1, z, T_lat, H/8, W/8), on every rank;
        `between(done, total)` after each chunk but the last (the stop check, which raises)."""

    def decode(
        self, decode_chunks: Callable[[torch.Tensor], Iterator[torch.Tensor]], latents: torch.Tensor
    ) -> Iterator[torch.Tensor]:
        """Whole uint8 chunks (f, H, W, 3) on rank 0, nothing on the others; `decode_chunks` is
        this pipeline's, handed each rank's part of the latents."""


def prompt_clean(text: str) -> str:
    """diffusers' Wan prompt cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class VideoResult:
    """A whole request's result in one piece (equivalence tests and benchmarks; serving streams)."""

    frames: torch.Tensor
    """uint8 (F, H, W, 3) on the host."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    latents: torch.Tensor | None = None
    """Final latents (B, z, T_lat, H/s, W/s) in float32."""


class WanVideoPipeline:
    """Prompt (+ image) -> frames for a Wan2.2 model, on one device (or one shard of a layout)."""

    def __init__(
        self,
        components: Components,
        info: ModelInfo,
        device: torch.device,
        predict_noise: NoisePredictor = serial_cfg,
        decode_latent_frames: int = 4,
        cfg_branch: str | None = None,
        experts: list[Expert] | None = None,
        vae_split: VaeSplit | None = None,
        is_main: bool = True,
        placement: Placement | None = None,
    ) -> None:
        if len(components.experts) != info.family.experts:
            raise ValueError(f"{info.family.name} has {info.family.experts} expert(s), {len(components.experts)} given")
        self.c = components
        self.info = info
        self.device = device
        self.predict_noise = predict_noise
        self.experts: list[Expert] = experts or [WholeExpert(m) for m in components.experts]
        """What each denoising step calls, in the components' order (`parallelize`'s objects under
        a layout)."""
        self.cfg_branch = cfg_branch
        """Under CFG-parallel, the one guidance branch ("cond"/"uncond") this rank's group runs: the
        text encoder skips the other prompt. None: this rank runs both."""
        self.vae_split = vae_split
        """The VAE's encode and decode split over the ranks; None: this rank's VAE alone."""
        self.is_main = is_main
        """Whether this rank delivers the video (decodes it when the VAE is not split)."""
        self.placement = placement
        """Where the weights wait between their stages (placement.Offload); None: all resident."""
        self.decode_latent_frames = decode_latent_frames
        """Latent frames per decoded chunk (each is 4 video frames, the first 1)."""
        self.prompt_cache: LruCache[torch.Tensor] | None = None
        """Prompt embeddings across requests (`caches`); None: every prompt is encoded."""
        self.condition_cache: LruCache[torch.Tensor] | None = None
        """I2V conditions across requests (`caches`); None: every image is encoded."""
        self.condition_encoder: ConditionEncoder = encode_mode
        """This rank's own encode of the I2V condition when the VAE is not split, (vae, video, between)
        -> latent mode: `vae_reuse.encode_mode` (diffusers' encode, chunk by chunk) or
        `vae_reuse.reuse_encode_mode`."""
        self.step_cache: StepCache | None = None
        """Set (and installed on the experts) by the engine for --cache-backend tea_cache/mag_cache."""
        self.vae_scale_temporal = int(components.vae.config.scale_factor_temporal)
        self.vae_scale_spatial = int(components.vae.config.scale_factor_spatial)
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_spatial)
        z_dim = components.vae.config.z_dim
        # (1, z, 1, 1, 1): the VAE's per-channel latent statistics
        self.latents_mean = torch.tensor(components.vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
        # diffusers keeps 1/std and multiplies (and divides by it to undo); same order, same rounding
        self.inv_latents_std = 1.0 / torch.tensor(components.vae.config.latents_std).view(1, z_dim, 1, 1, 1)

    @property
    def transformer_dtype(self) -> torch.dtype:
        return next(self.c.transformer.parameters()).dtype

    # -- stages ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompt(self, prompt: str, cached: bool = True) -> torch.Tensor:
        """(1, 512, text_dim) embeddings, zero past the prompt's length, as diffusers makes them."""
        if cached and self.prompt_cache is not None:
            key = (prompt, str(self.info.path or self.info.config_name), str(self.c.text_encoder.dtype))
            return self.prompt_cache.get_or_make(key, lambda: self.encode_prompt(prompt, cached=False))
        inputs = self.c.tokenizer(
            [prompt_clean(prompt)],
            padding="max_length",
            max_length=MAX_SEQUENCE_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
        seq_len = int(mask.gt(0).sum())
        embeds = self.c.text_encoder(ids, mask).last_hidden_state  # (1, 512, text_dim)
        embeds = embeds.to(self.c.text_encoder.dtype)
        embeds[:, seq_len:] = 0
        return embeds.to(self.transformer_dtype)

    def initial_noise(self, params: GenerationParams) -> torch.Tensor:
        """(1, z, T_lat, H/s, W/s) float32 noise (z and s the VAE's: 16, 8 for A14B; 48, 16 for TI2V)
        from a CPU generator: device- and rank-independent."""
        shape = (
            1,
            int(self.c.vae.config.z_dim),
            (params.num_frames - 1) // self.vae_scale_temporal + 1,
            params.height // self.vae_scale_spatial,
            params.width // self.vae_scale_spatial,
        )
        generator = torch.Generator("cpu").manual_seed(params.seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    @torch.inference_mode()
    def image_condition(
        self, params: GenerationParams, cached: bool = True, control: StepControl | None = None
    ) -> torch.Tensor:
        """I2V condition (1, 4 + 16, T_lat, h, w): first-frame mask then the image's latent mode.
        `control` is asked between the encode's chunks (on every rank), so a stop lands within one."""
        vae = self.c.vae
        if cached and self.condition_cache is not None:
            image = params.image
            key = (pixels_digest(image.width, image.height, image.rgb), params.size, params.num_frames, str(vae.dtype))
            return self.condition_cache.get_or_make(key, lambda: self.image_condition(params, False, control))

        def between(done: int, total: int) -> None:
            if control is not None and not control(done, total, "encode"):
                raise JobCancelled(f"stopped while encoding the image, after chunk {done} of {total}")

        # decoded once on rank 0 by validation; here only made into a PIL image
        image = self.video_processor.preprocess(params.image.to_pil(), height=params.height, width=params.width)
        image = image.to(self.device, dtype=torch.float32)  # (1, 3, H, W) in [-1, 1]
        # (1, 3, F, H, W): the image, then black frames
        video_condition = torch.cat(
            [image.unsqueeze(2), image.new_zeros(1, 3, params.num_frames - 1, params.height, params.width)], dim=2
        ).to(vae.dtype)
        if self.vae_split is not None:
            latent = self.vae_split.encode(vae, video_condition, between)
        else:
            latent = self.condition_encoder(vae, video_condition, between)
        latent = latent.to(torch.float32)
        latent = (latent - self.latents_mean.to(latent)) * self.inv_latents_std.to(latent)

        t_scale = self.vae_scale_temporal
        lat_h, lat_w = params.height // self.vae_scale_spatial, params.width // self.vae_scale_spatial
        mask = torch.zeros(1, 1, params.num_frames, lat_h, lat_w)
        mask[:, :, 0] = 1
        # The first frame's mask is repeated 4x so frames fold into (T_lat, 4) groups.
        mask = torch.cat([mask[:, :, :1].repeat_interleave(t_scale, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(1, -1, t_scale, lat_h, lat_w).transpose(1, 2)  # (1, 4, T_lat, h, w)
        return torch.cat([mask.to(latent), latent], dim=1)

    @torch.inference_mode()
    def first_frame_latent(self, params: GenerationParams) -> torch.Tensor:
        """TI2V condition (1, z, 1, h, w): the normalised latent mode of the image alone."""
        vae = self.c.vae
        image = self.video_processor.preprocess(params.image.to_pil(), height=params.height, width=params.width)
        image = image.to(self.device, dtype=torch.float32).unsqueeze(2)  # (1, 3, 1, H, W) in [-1, 1]
        latent = vae.encode(image.to(vae.dtype)).latent_dist.mode().to(torch.float32)
        return (latent - self.latents_mean.to(latent)) * self.inv_latents_std.to(latent)

    def denoise_mask(self, latents: torch.Tensor, first_frame: torch.Tensor | None) -> torch.Tensor:
        """(1, 1, T_lat, h, w) float32: 1 where the model denoises, 0 on a conditioned first frame."""
        mask = torch.ones(1, 1, *latents.shape[2:], dtype=torch.float32, device=latents.device)
        if first_frame is not None:
            mask[:, :, 0] = 0
        return mask

    def token_timesteps(self, mask: torch.Tensor, t: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, tokens) timesteps, one per patch (the mask sampled at each patch's corner, as diffusers
        does): t, or 0 on the conditioned first frame."""
        p = self.info.family.patch_size
        per_token = (mask[0, 0, :, ::p, ::p] * t).flatten()  # (T_lat * h/p * w/p,)
        return per_token.unsqueeze(0).expand(batch, -1)

    def make_scheduler(self, flow_shift: float, kind: str = "default"):
        """A fresh scheduler per job (schedulers keep state), with the request's flow_shift: the
        folder's (UniPC), or flow-matching Euler for `scheduler = "euler"` (params.SCHEDULERS)."""
        if kind == "euler":
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)
        return type(self.c.scheduler).from_config(self.c.scheduler.config, flow_shift=flow_shift)

    @torch.inference_mode()
    def denoise(
        self,
        params: GenerationParams,
        latents: torch.Tensor,
        condition: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        negative_embeds: torch.Tensor | None,
        control: StepControl | None = None,
        on_step: Callable[[int, int], None] | None = None,
        first_frame: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The two-expert loop with CFG; returns float32 latents. `first_frame` is TI2V's image latent
        (per-token timesteps are used whenever the family expands timesteps, with or without it)."""
        scheduler = self.make_scheduler(params.flow_shift, params.scheduler)
        set_schedule(scheduler, params, self.device)
        timesteps = scheduler.timesteps
        boundary_timestep = (
            None if params.boundary_ratio is None else params.boundary_ratio * scheduler.config.num_train_timesteps
        )
        do_cfg = params.guidance_scale > 1.0  # diffusers' rule, applied to both experts
        dtype = self.transformer_dtype
        total = len(timesteps)
        expand = self.info.family.expand_timesteps
        mask = self.denoise_mask(latents, first_frame) if expand else None
        for i, t in enumerate(timesteps):
            if control is not None and not control(i, total):
                raise JobCancelled(f"cancelled at step {i} of {total}")
            model, guidance = self.expert_for(t, boundary_timestep, params)
            if self.placement is not None:  # the expert switch: this step's expert on the device
                self.placement.use_expert(0 if model is self.experts[0] else 1)
            if self.step_cache is not None:  # decided (and agreed) before the step's forwards
                self.step_cache.begin_step(i, total, t, model)
            model_input = latents if condition is None else torch.cat([latents, condition], dim=1)
            if first_frame is not None:  # the model sees the image's latent as the first frame
                model_input = (1 - mask) * first_frame + mask * latents
            model_input = model_input.to(dtype)
            timestep = self.token_timesteps(mask, t, latents.shape[0]) if expand else t.expand(latents.shape[0])
            noise_pred = self.predict_noise(
                model, model_input, timestep, prompt_embeds, negative_embeds, guidance if do_cfg else None
            )
            if self.step_cache is not None:
                self.step_cache.end_step()
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, total)
        if first_frame is not None:  # the scheduler stepped its own first frame; the image's is kept
            latents = (1 - mask) * first_frame + mask * latents
        if self.placement is not None:
            self.placement.denoised()
        return latents

    def expert_for(self, t: torch.Tensor, boundary_timestep: float | None, params: GenerationParams):
        """(expert, guidance) for timestep t: the high-noise expert (`transformer`) while
        t >= boundary, the low-noise one (`transformer_2`) below; one expert runs every step."""
        if len(self.experts) == 1 or boundary_timestep is None:
            return self.experts[0], params.guidance_scale
        if t >= boundary_timestep:  # high-noise stage
            return self.experts[0], params.guidance_scale
        return self.experts[1], params.guidance_scale_2  # low-noise stage

    def decode_chunk_count(self, latents: torch.Tensor) -> int:
        return -(-latents.shape[2] // self.decode_latent_frames)

    def follow_decode(self, latents: torch.Tensor, control: StepControl | None) -> Iterator[torch.Tensor]:
        """A rank that decodes nothing (rank 0 decodes alone) still joins every chunk's stop check."""
        total = self.decode_chunk_count(latents)
        for done in range(1, total):
            if control is not None and not control(done, total, "decode"):
                raise JobCancelled(f"stopped while decoding, after chunk {done} of {total}")
        yield from ()

    @torch.inference_mode()
    def decode_chunks(self, latents: torch.Tensor, control: StepControl | None = None) -> Iterator[torch.Tensor]:
        """Latents -> uint8 frames (f, H, W, 3) on the device, a few latent frames at a time.

        Wan's VAE decodes latent frame by latent frame with a causal cache (diffusers' `_decode`
        loop); we run the same loop and hand out each chunk as soon as it exists, so the mp4 writer
        encodes while the rest decodes. Element-wise post-processing per chunk gives the same bytes
        as decoding the whole video at once. `control` is asked between chunks (not after the last),
        so a stop lands within one chunk.
        """
        vae = self.c.vae
        latents = latents.to(vae.dtype)
        latents = latents / self.inv_latents_std.to(latents) + self.latents_mean.to(latents)
        vae.clear_cache()
        try:
            x = vae.post_quant_conv(latents)
            num_latent_frames = x.shape[2]
            pending = []
            for i in range(num_latent_frames):
                pending.append(decode_latent_frame(vae, x[:, :, i : i + 1], first=i == 0))
                if len(pending) == self.decode_latent_frames or i == num_latent_frames - 1:
                    video = torch.cat(pending, dim=2) if len(pending) > 1 else pending[0]  # (1, 3, f, H, W)
                    pending = []
                    if vae.config.patch_size is not None:
                        video = unpatchify(video, patch_size=vae.config.patch_size)
                    video = video.clamp(-1.0, 1.0)
                    video = (video / 2 + 0.5).clamp(0, 1)
                    # (1, 3, f, H, W) -> (f, H, W, 3); diffusers' numpy_to_pil rounds the same way.
                    # Made contiguous on the device: the GPU transposes in microseconds what the
                    # host (np.ascontiguousarray in the writer) took ~0.3 s per 720p chunk to do
                    yield (video[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8).contiguous()
                    done, total = i // self.decode_latent_frames + 1, self.decode_chunk_count(latents)
                    if control is not None and done < total and not control(done, total, "decode"):
                        raise JobCancelled(f"stopped while decoding, after chunk {done} of {total}")
        finally:
            vae.clear_cache()

    # -- the whole request ----------------------------------------------------------------------

    def __call__(self, params: GenerationParams, control: StepControl | None = None) -> VideoResult:
        """The whole request in one piece on one device (tests, benchmarks): steps 1-4."""
        state = self.generate_latents(params, control)
        frames = torch.cat([chunk.cpu() for chunk in self.timed_decode(state, self.decode_chunks(state.latents))])
        return VideoResult(frames=frames, timings_ms=state.timer.ms, latents=state.latents)

    def generate_latents(
        self,
        params: GenerationParams,
        control: StepControl | None = None,
        on_step: Callable[[int, int], None] | None = None,
        cache_agree: Agree | None = None,
    ) -> Latents:
        """Steps 1-3, which every rank runs together (the experts' collectives are in here).
        `cache_agree` agrees the step cache's decisions across ranks (the runtime's; None: alone)."""
        timer = _StageTimer(self.device)
        timer.start("PipelineWall")
        caches = {"Prompt": self.prompt_cache, "Condition": self.condition_cache}
        counts_before = snapshot(caches)
        do_cfg = params.guidance_scale > 1.0
        # 1. Encode prompts: the negative one only when CFG will run, and under CFG-parallel only
        #    the one this rank's branch needs (None for the other)
        with timer("TextEncoding"), self.placement.encoding() if self.placement is not None else nullcontext():
            wants_cond = not do_cfg or self.cfg_branch != "uncond"
            wants_uncond = do_cfg and self.cfg_branch != "cond"
            prompt_embeds = self.encode_prompt(params.prompt) if wants_cond else None
            negative_embeds = self.encode_prompt(params.negative_prompt) if wants_uncond else None
        # 2. Initial noise and the image condition: channel-concat (A14B), first frame (TI2V with an image)
        with timer("LatentPreparation"):
            latents = self.initial_noise(params)
            condition = first_frame = None
            conditioning = self.info.family.conditioning
            if conditioning == "channel_concat":
                condition = self.image_condition(params, control=control)
            elif conditioning == "first_frame" and params.image is not None:
                first_frame = self.first_frame_latent(params)
        timer.ms.update(lookup_counts(caches, counts_before))  # cache hits and misses, counts not ms
        # 3. Denoising loop over the experts (the step cache, if any, fresh for this job)
        cache = self.step_cache
        if cache is not None:
            branches = 2 if do_cfg else 1
            cache.begin_job(params.cache_threshold, params.width, params.height, branches, cache_agree)
        try:
            with timer("Denoising"):
                latents = self.denoise(
                    params,
                    latents,
                    condition,
                    prompt_embeds,
                    negative_embeds,
                    control,
                    on_step,
                    first_frame=first_frame,
                )
        finally:
            if cache is not None:  # the residuals are freed however the job ends
                timer.ms.update(cache.end_job().timings())
        return Latents(params, latents, timer)

    def decode_video(self, latents: torch.Tensor, control: StepControl | None = None) -> Iterator[torch.Tensor]:
        """The video's uint8 chunks on the delivering rank (split over the ranks by the `VaeSplit`,
        or decoded there alone); other ranks take part and get nothing. `control` is asked between
        chunks on every rank (a rank that decodes nothing still joins the checks)."""
        decode = partial(self.decode_chunks, control=control)
        follow = partial(self.follow_decode, control=control)
        if self.vae_split is not None:
            yield from self.vae_split.decode(decode, latents, follow)
        elif self.is_main:
            yield from decode(latents)
        else:
            yield from follow(latents)

    def timed_decode(
        self, state: Latents, chunks: Iterator[torch.Tensor] | None = None, control: StepControl | None = None
    ) -> Iterator[torch.Tensor]:
        """Step 4: the decoded chunks (`decode_video`'s, or `chunks`), timed as Decoding;
        PipelineWall ends with the last one, and one log line gives the stages."""
        timer, params = state.timer, state.params
        timer.start("Decoding")
        yield from self.decode_video(state.latents, control) if chunks is None else chunks
        timer.stop("Decoding")
        timer.stop("PipelineWall")
        log.info(
            "request seed=%d %s x%d frames, %d steps: %s",
            params.seed,
            params.size,
            params.num_frames,
            params.num_inference_steps,
            " ".join(f"{k}={v:.0f}{'' if k in COUNT_KEYS else 'ms'}" for k, v in timer.ms.items()),
        )


@dataclass
class Latents:
    """A job between its collective part (denoising) and its one-rank part (decoding)."""

    params: GenerationParams
    latents: torch.Tensor
    """(1, z, T_lat, H/s, W/s) float32."""
    timer: _StageTimer


class _StageTimer:
    """Wall-clock stage timings in ms, synchronising the device so GPU work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str):
        self.start(name)
        yield
        self.stop(name)

    def start(self, name: str) -> None:
        self._sync()
        self._started[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self._sync()
        self.ms[name] = (time.perf_counter() - self._started.pop(name)) * 1000.0


def set_schedule(scheduler, params: GenerationParams, device: torch.device) -> None:
    """The job's timesteps. Euler's sigmas before the shift are 1, 1 - 1/n, ..., 1/n: for 4 steps
    at shift 5 the timesteps 1000, 937.5, 833.3, 625 of lightx2v's 4-step distillation (its
    denoising_step_list [1000, 750, 500, 250] shifted), not diffusers' default spacing."""
    steps = params.num_inference_steps
    if params.scheduler == "euler":
        scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], device=device)
    else:
        scheduler.set_timesteps(steps, device=device)
