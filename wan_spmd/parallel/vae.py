"""Where the VAE runs: the decode seam's implementations and the split I2V condition encode.

`RowSplit` (what `split_vae` returns where there is more than one rank, and the pipeline calls for
its VAE encode and decode): every rank holds the whole VAE and works on a band of rows of every
frame, so the decode of each chunk of latent frames, and the I2V condition's encode, are split over
all ranks. Without one, rank 0 decodes alone (the pipeline's own path). Why rows, and why it is exact:
- Latent frames cannot be split over ranks: the decoder is causal in time (each frame's convs read
  a cache of the previous frames' features), so frame i needs frames < i decoded first.
- A band of rows can be. Wan's VAE normalises per position (RMS over channels), its activations are
  element-wise and its upsamplers are nearest-neighbour, so the only things that look across rows
  are (a) the 3x3 spatial kernels and (b) the middle block's attention over the whole frame.
  (a) Before every conv with a spatial kernel each rank takes one halo row from each neighbour (an
  all-gather of every rank's first and last row; zeros at the frame's top and bottom, as the conv's
  own zero padding would give); the causal time cache is band-local and is concatenated before the
  halo is taken, so the neighbours' halos include their cached frames too. (b) The attention block
  (at the latent resolution, the cheapest place in the decoder) gathers the whole frame, runs
  unchanged on every rank and keeps its band. The encoder's stride-2 downsamples need one halo row
  below (their padding is bottom/right only); bands start on latent-row boundaries, so every
  stride lines up.
  The result is the single-rank VAE's, computed on smaller tensors; only a convolution's summation
  order may differ (float rounding; tests/dist/test_parallel_modes.py measures it).
- Tiled decoding (diffusers' tiles with blended overlaps) is not this: it changes the result.

Each decoded chunk is turned into uint8 on its band (element-wise, so the same bytes) and gathered
to rank 0 chunk by chunk: rank 0's mp4 writer encodes while the next chunk decodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from wan_spmd.compat import causal_conv_padding
from wan_spmd.vae_reuse import Between, ConditionEncoder, encode_mode

log = logging.getLogger("wan_spmd")

ChunkDecoder = Callable[[torch.Tensor], Iterator[torch.Tensor]]
"""latents (1, z, T_lat, h, w) -> uint8 chunks (f, H, W, 3): the pipeline's `decode_chunks`."""


def even_bands(rows: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of each part of `rows`, the first `rows % parts` parts one row longer."""
    base, extra = divmod(rows, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class RowSplit:
    """The world's ranks each working on a band of latent rows; see the module docstring."""

    def __init__(self, world_size: int, rank: int, spatial_scale: int, group: dist.ProcessGroup | None = None) -> None:
        self.size, self.rank, self.scale = world_size, rank, spatial_scale
        self.group = group or dist.group.WORLD
        self.bands: list[tuple[int, int]] | None = None
        """Latent-row bands of the running encode/decode; None outside one (the wrappers pass through)."""
        self.band_encoder: ConditionEncoder = encode_mode
        """(vae, band of the video, between) -> its latent mode: `vae_reuse.encode_mode`, or
        `vae_reuse.reuse_encode_mode` with `all_true` as its agreement."""

    @property
    def active(self) -> bool:
        return self.bands is not None

    @contextmanager
    def split(self, latent_rows: int) -> Iterator[tuple[int, int]]:
        self.bands = even_bands(latent_rows, self.size)
        try:
            yield self.bands[self.rank]
        finally:
            self.bands = None

    def all_true(self, flag: torch.Tensor) -> bool:
        """Whether `flag` (a 0-dim bool tensor) is true on every rank: one tiny all-reduce."""
        flag = flag.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def heights(self, x: torch.Tensor) -> list[int]:
        """Every rank's band height at `x`'s resolution (rows per latent row x each band)."""
        start, stop = self.bands[self.rank]
        per_latent_row = x.shape[-2] // (stop - start)
        return [(b - a) * per_latent_row for a, b in self.bands]

    def with_halo(self, x: torch.Tensor, top: bool = True) -> torch.Tensor:
        """(..., h, W) band -> (..., [1 +] h + 1, W) with the neighbours' edge rows (zeros at the
        frame's edges); without the top row for the encoder's bottom-padded downsamples."""
        edges = torch.cat([x[..., :1, :], x[..., -1:, :]], dim=-2).unsqueeze(0).contiguous()  # (1, ..., 2, W)
        every = funcol.all_gather_tensor(edges, 0, self.group)  # (n, ..., 2, W)
        zero = torch.zeros_like(x[..., :1, :])
        below = every[self.rank + 1][..., :1, :] if self.rank + 1 < self.size else zero
        if not top:
            return torch.cat([x, below], dim=-2)
        above = every[self.rank - 1][..., 1:, :] if self.rank > 0 else zero
        return torch.cat([above, x, below], dim=-2)

    def all_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(..., h_r, W) on each rank -> (..., sum h, W) everywhere (bands padded to one height)."""
        heights = self.heights(x)
        tallest = max(heights)
        padded = F.pad(x, (0, 0, 0, tallest - x.shape[-2])).unsqueeze(0).contiguous()
        every = funcol.all_gather_tensor(padded, 0, self.group)  # (n, ..., tallest, W)
        return torch.cat([every[i][..., :h, :] for i, h in enumerate(heights)], dim=-2)

    def rows_to_main(self, chunk: torch.Tensor) -> torch.Tensor | None:
        """uint8 (f, h_r, W, 3) bands -> the whole (f, H, W, 3) on rank 0 (None elsewhere)."""
        start, stop = self.bands[self.rank]
        per_latent_row = chunk.shape[1] // (stop - start)
        heights = [(b - a) * per_latent_row for a, b in self.bands]
        tallest = max(heights)
        padded = F.pad(chunk, (0, 0, 0, 0, 0, tallest - chunk.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
        if self.rank != 0:
            return None
        return torch.cat([p[:, :h] for p, h in zip(parts, heights, strict=True)], dim=1)

    # -- the two seams --------------------------------------------------------------------------

    def encode(self, vae: nn.Module, video: torch.Tensor, between: Between | None = None) -> torch.Tensor:
        """The I2V condition's encode (`VaeSplit.encode`): each rank encodes a band of rows, all
        gather the latent. `between` (the job's stop check) runs after each chunk on every rank."""
        rows = video.shape[-2] // self.scale
        if rows < self.size:  # too few rows to split: every rank encodes the whole video
            return encode_mode(vae, video, between)
        with self.split(rows) as (start, stop):
            band = video[..., start * self.scale : stop * self.scale, :].contiguous()
            return self.all_rows(self.band_encoder(vae, band, between=between))

    def decode(
        self, decode_chunks: ChunkDecoder, latents: torch.Tensor, follow: ChunkDecoder | None = None
    ) -> Iterator[torch.Tensor]:
        """The decode seam: each chunk decoded on this rank's band by `decode_chunks`, gathered to
        rank 0 as uint8; rank 0 yields the whole chunks, the other ranks nothing. When rank 0
        decodes alone, the others run `follow` (the pipeline's: it joins each chunk's stop check)."""
        rows = latents.shape[-2]
        if rows < self.size:  # fewer latent rows than ranks: rank 0 alone
            if self.rank == 0:
                yield from decode_chunks(latents)
            elif follow is not None:
                yield from follow(latents)
            return
        with self.split(rows) as (start, stop):
            for chunk in decode_chunks(latents[..., start:stop, :]):
                whole = self.rows_to_main(chunk)
                if whole is not None:
                    yield whole


# -- the VAE's row-crossing modules, wrapped -------------------------------------------------------


class BandCausalConv3d(nn.Module):
    """A `WanCausalConv3d` with a 3x3 spatial kernel on a band: halo rows instead of zero padding."""

    def __init__(self, conv: nn.Module, split: RowSplit) -> None:
        super().__init__()
        self.conv, self.split = conv, split

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        conv = self.conv
        if not self.split.active:
            return conv(x, cache_x)
        w_pad, _, h_pad, _, t_pad, _ = causal_conv_padding(conv)  # (W, W, H, H, T-before, T-after)
        if cache_x is not None and t_pad > 0:  # the causal cache first, as the conv itself does
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            t_pad -= cache_x.shape[2]
        x = self.split.with_halo(x)
        x = F.pad(x, (w_pad, w_pad, 0, 0, t_pad, 0))
        return nn.Conv3d.forward(conv, x)  # its own padding is (0, 0, 0)


class BandConv2d(nn.Module):
    """The upsamplers' 3x3 `nn.Conv2d` (padding 1) on a band."""

    def __init__(self, conv: nn.Conv2d, split: RowSplit) -> None:
        super().__init__()
        self.conv, self.split = conv, split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if not self.split.active:
            return conv(x)
        x = self.split.with_halo(x)
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


class BandDownPad(nn.Module):
    """The downsamples' ZeroPad2d((0, 1, 0, 1)) on a band: the row below comes from the next rank."""

    def __init__(self, split: RowSplit) -> None:
        super().__init__()
        self.split = split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split.active:
            return F.pad(x, (0, 1, 0, 1))
        return F.pad(self.split.with_halo(x, top=False), (0, 1, 0, 0))


class WholeFrameAttention(nn.Module):
    """The middle block's attention over the whole frame: gather the bands, run, keep this band."""

    def __init__(self, block: nn.Module, split: RowSplit) -> None:
        super().__init__()
        self.block, self.split = block, split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split.active:
            return self.block(x)
        heights = self.split.heights(x)
        start = sum(heights[: self.split.rank])
        return self.block(self.split.all_rows(x))[..., start : start + heights[self.split.rank], :]


def split_vae(vae: nn.Module, world_size: int, rank: int) -> RowSplit | None:
    """Wrap the VAE's row-crossing modules for a row split over the world, in place, and return the
    split for the pipeline to call; None (and the VAE untouched) for one rank or a VAE this split
    does not cover (Wan2.2-5B's patchified, residual one). The wrappers pass through outside a
    split, so the same VAE still decodes whole."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d, WanResample

    if world_size == 1:
        return None
    if vae.config.patch_size is not None or getattr(vae.config, "is_residual", False):
        log.warning("this VAE (patchified or residual) is decoded on rank 0 alone")
        return None
    split = RowSplit(world_size, rank, int(vae.config.scale_factor_spatial))
    for coder in (vae.encoder, vae.decoder):
        for parent in list(coder.modules()):
            for name, child in list(parent.named_children()):
                rows = causal_conv_padding(child)[2] if isinstance(child, WanCausalConv3d) else 0
                if rows > 0:
                    if rows != 1:
                        raise ValueError(f"VAE conv {name} pads {rows} rows; the row split takes 1")
                    setattr(parent, name, BandCausalConv3d(child, split))
                elif isinstance(child, WanAttentionBlock):
                    setattr(parent, name, WholeFrameAttention(child, split))
                elif isinstance(child, WanResample) and child.mode.startswith("upsample"):
                    child.resample[1] = BandConv2d(child.resample[1], split)
                elif isinstance(child, WanResample) and child.mode.startswith("downsample"):
                    child.resample[0] = BandDownPad(split)
    return split
