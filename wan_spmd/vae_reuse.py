"""The I2V condition's VAE encode with exact reuse of repeated work.

The condition video is the input image followed by black frames, and Wan's encoder reads it
causally, chunk by chunk (1 frame, then 4 at a time), each causal convolution keeping the last
frames of its input in a cache (diffusers' `feat_cache`/`feat_idx`). Once the image has left a
layer's temporal reach, that layer sees exactly the same chunk and the same cache as on its previous
call, so it computes exactly the same output again. The latent frames themselves never become
constant within 81 frames (the lowest level reaches back about 20 chunks), but the full-resolution
levels, where most of the FLOPs are, repeat themselves after a few chunks.

`reuse_encode_mode` runs diffusers' encode loop (`AutoencoderKLWan._encode`) stage by stage: the
encoder's `conv_in`, each entry of `down_blocks` (a residual block or a resample), the middle block,
and the head. A stage is a deterministic function of its input chunk and of the cache slots it
reads (the same slots it then overwrites). Where both are bitwise equal to its previous call's, its
previous output is returned and its slots are left as they are: they already hold what it would
write again. Bitwise means the bits (floats viewed as integers), so -0.0 is not +0.0 and a NaN is
never equal to anything but itself's bits; the latents are those of the full encode exactly, as
long as the convolutions are deterministic for repeated identical calls (CPU: yes; the GPU:
`benchmarks/vae_encode_reuse.py` checks it).

Why checking is cheap:
- the input chunk of a stage is usually the very tensor object its previous call got (the stage
  before returned its stored output): identity, nothing read;
- otherwise one elementwise comparison, which reads two chunks once, against a stage's two or more
  3x3x3 convolutions (27 multiply-adds per input element and output channel);
- a cache slot is compared when diffusers overwrites it (`_TrackedCache`), old value against new,
  so no old copy is kept: only a flag per slot.
On the GPU a comparison stays on the device and one host sync per stage call decides (about 14
stages x 21 chunks for 81 frames); with a row split over ranks, every rank must take the same
branch (a skipped stage skips its halo exchanges), so `agree` all-reduces that flag first.

Memory: each stage keeps its last input and output alive for the whole encode (the output of one
stage is the next one's input, so that is one chunk's activation at every stage boundary). For the
A14B VAE (base 96, fp32) that is 6.55 GB at 1280x720 and 2.84 GB at 832x480 on one rank (two thirds
of it the full-resolution level; half of it in bf16, a 1/n share on each of n ranks): measured as
`EncodeStats.held_bytes`, 7.28 MB at 32x32, which scales with the area.

`encode_mode` is the same loop without reuse, the default encode: both run diffusers' chunks here
rather than inside `vae.encode`, so that the job's stop check (`between`) runs after every chunk
and a deadline, cancel or SIGTERM lands within one chunk of the encode, as it does in the decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

CACHE_T = 2  # diffusers' frames kept per causal cache (autoencoder_kl_wan.CACHE_T)

Agree = Callable[[torch.Tensor], bool]
"""(0-dim bool tensor: this rank's stage may be reused) -> whether every rank's may; one rank: bool()."""
Between = Callable[[int, int], None]
"""Called after encoded chunk `done` of `total` (not after the last) on every rank alike: the job's
stop check, which raises to stop."""


class ConditionEncoder(Protocol):
    """(vae, video) -> the latent mode of `vae.encode(video)`, with the stop check between chunks."""

    def __call__(self, vae: nn.Module, video: torch.Tensor, between: Between | None = None) -> torch.Tensor: ...


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool | torch.Tensor:
    """Whether two tensors hold the same bits: False at once for another shape or dtype; on the CPU a
    bool, elsewhere a 0-dim bool tensor left on the device (no sync)."""
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    bits = _BITS[a.element_size()]
    a, b = a.view(bits), b.view(bits)
    if a.device.type == "cpu":
        return torch.equal(a, b)
    return torch.eq(a, b).all()


def _all(flags: list[bool | torch.Tensor], device: torch.device) -> torch.Tensor:
    """AND of flags as one 0-dim bool tensor on `device` (no sync: tensors stay on the device)."""
    out = torch.ones((), dtype=torch.bool, device=device)
    for flag in flags:
        if flag is False:
            return torch.zeros((), dtype=torch.bool, device=device)
        if flag is not True:
            out = out & flag.to(device)
    return out


class _TrackedCache(list):
    """diffusers' `feat_cache` list, noting at every overwrite whether the new value has the old
    one's bits (compared then, so the old value is not kept)."""

    def __init__(self, slots: int) -> None:
        super().__init__([None] * slots)
        self.unchanged: list[bool | torch.Tensor] = [False] * slots

    def __setitem__(self, idx, value) -> None:  # type: ignore[override]
        old = list.__getitem__(self, idx)
        same = isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) and bits_equal(old, value)
        self.unchanged[idx] = same
        list.__setitem__(self, idx, value)


Stage = Callable[[torch.Tensor, _TrackedCache, list[int]], torch.Tensor]


@dataclass
class StageStats:
    name: str
    calls: int = 0
    reused: int = 0


@dataclass
class EncodeStats:
    """What one encode reused, and the memory that cost."""

    stages: list[StageStats] = field(default_factory=list)
    held_bytes: int = 0
    """Bytes of the stored inputs and outputs at the end of the encode (distinct storages)."""

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.stages)

    @property
    def reused(self) -> int:
        return sum(s.reused for s in self.stages)


class _Memo:
    """One stage's previous call: its input, output and the cache slots it used."""

    def __init__(self, stage: Stage, stats: StageStats) -> None:
        self.stage, self.stats = stage, stats
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self.slots = (0, 0)

    def __call__(self, x: torch.Tensor, cache: _TrackedCache, feat_idx: list[int], agree: Agree) -> torch.Tensor:
        self.stats.calls += 1
        start = feat_idx[0]
        if self.out is not None and self.slots[0] == start:
            flags = [cache.unchanged[s] for s in range(*self.slots)]
            flags.append(bits_equal(x, self.x))
            if agree(_all(flags, x.device)):
                feat_idx[0] = self.slots[1]
                for s in range(*self.slots):
                    cache.unchanged[s] = True  # left as it was: what the stage would write again
                self.stats.reused += 1
                return self.out
        out = self.stage(x, cache, feat_idx)
        self.x, self.out, self.slots = x, out, (start, feat_idx[0])
        return out


def _causal_conv(conv: nn.Module, x: torch.Tensor, feat_cache: list, feat_idx: list[int]) -> torch.Tensor:
    """A causal conv called as `WanEncoder3d.forward` calls `conv_in`/`conv_out` (same cache rule)."""
    idx = feat_idx[0]
    cache_x = x[:, :, -CACHE_T:, :, :].clone()
    if cache_x.shape[2] < 2 and feat_cache[idx] is not None:
        cache_x = torch.cat([feat_cache[idx][:, :, -1, :, :].unsqueeze(2).to(cache_x.device), cache_x], dim=2)
    x = conv(x, feat_cache[idx])
    feat_cache[idx] = cache_x
    feat_idx[0] += 1
    return x


def encoder_stages(encoder: nn.Module) -> list[tuple[str, Stage]]:
    """`WanEncoder3d.forward` cut into stages, in its order."""

    def head(x, feat_cache, feat_idx):
        x = encoder.nonlinearity(encoder.norm_out(x))
        return _causal_conv(encoder.conv_out, x, feat_cache, feat_idx)

    stages: list[tuple[str, Stage]] = [("conv_in", lambda x, c, i: _causal_conv(encoder.conv_in, x, c, i))]
    for n, layer in enumerate(encoder.down_blocks):
        stages.append((f"down_blocks.{n}", lambda x, c, i, layer=layer: layer(x, feat_cache=c, feat_idx=i)))
    stages.append(("mid_block", lambda x, c, i: encoder.mid_block(x, feat_cache=c, feat_idx=i)))
    stages.append(("head", head))
    return stages


def _cache_slots(encoder: nn.Module) -> int:
    """Slots of the encoder's `feat_cache`: one per causal conv, as `AutoencoderKLWan.clear_cache` counts
    them (a row split's wrappers hold the same convs)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in encoder.modules())


def _one_rank(flag: torch.Tensor) -> bool:
    return bool(flag)


def reuse_encode_mode(
    vae: nn.Module,
    video: torch.Tensor,
    between: Between | None = None,
    agree: Agree | None = None,
    stats: EncodeStats | None = None,
) -> torch.Tensor:
    """`vae.encode(video).latent_dist.mode()`, bitwise, computing each stage only when its input or
    cache changed. `between` is the stop check after each chunk but the last; `agree` makes the
    ranks of a row split take the same branches; `stats` is filled in when given."""
    if _whole_only(vae):
        return vae.encode(video).latent_dist.mode()
    agree = agree or _one_rank
    stats = stats if stats is not None else EncodeStats()
    memos = [_Memo(stage, StageStats(name)) for name, stage in encoder_stages(vae.encoder)]
    stats.stages = [m.stats for m in memos]
    cache = _TrackedCache(_cache_slots(vae.encoder))

    def through_stages(x: torch.Tensor) -> torch.Tensor:
        feat_idx = [0]
        for memo in memos:
            x = memo(x, cache, feat_idx, agree)
        return x

    outs = _by_chunks(video, through_stages, between)
    video_storage = video.untyped_storage().data_ptr()
    stored = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in memos for t in (m.x, m.out)}
    stored.pop(video_storage, None)  # the first stage's input is a view of the video itself
    stats.held_bytes = sum(stored.values())
    # the stages' stored chunks and the cache slots, freed before quant_conv (as `del` did)
    memos.clear()
    cache.clear()
    return _mode(vae, outs)


def _whole_only(vae: nn.Module) -> bool:
    """Not the A14B condition's VAE (patchified: TI2V's; or tiled): encoded by diffusers in one call."""
    return vae.config.patch_size is not None or vae.use_tiling


def _by_chunks(
    video: torch.Tensor, encode_chunk: Callable[[torch.Tensor], torch.Tensor], between: Between | None
) -> list[torch.Tensor]:
    """diffusers' `_encode` loop: `encode_chunk` on 1 frame, then 4 at a time; `between(done, total)`
    after each chunk but the last. The encoder outputs, in order."""
    num_frames = video.shape[2]
    chunks = [slice(0, 1)] + [slice(1 + 4 * i, 5 + 4 * i) for i in range((num_frames - 1) // 4)]
    outs = []
    for done, frames in enumerate(chunks, 1):
        outs.append(encode_chunk(video[:, :, frames]))
        if between is not None and done < len(chunks):
            between(done, len(chunks))
    return outs


def _mode(vae: nn.Module, outs: list[torch.Tensor]) -> torch.Tensor:
    moments = vae.quant_conv(torch.cat(outs, dim=2))  # (1, 2z, T_lat, h, w): mean then log-variance
    return moments[:, : moments.shape[1] // 2]  # DiagonalGaussianDistribution(...).mode() is the mean


def encode_mode(vae: nn.Module, video: torch.Tensor, between: Between | None = None) -> torch.Tensor:
    """`vae.encode(video).latent_dist.mode()`, bitwise: diffusers' chunk loop run here, `between`
    called after each chunk but the last."""
    if _whole_only(vae):
        return vae.encode(video).latent_dist.mode()
    cache: list = [None] * _cache_slots(vae.encoder)
    return _mode(vae, _by_chunks(video, lambda x: vae.encoder(x, feat_cache=cache, feat_idx=[0]), between))
