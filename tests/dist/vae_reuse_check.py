"""A test-owned SPMD program (torchrun, gloo): the row-split I2V condition encode with exact reuse
against the same row-split encode computed whole, on this world. Rank 0 saves both latents and the
reuse counts of every case to OUT/reuse-<world>.pt.

Cases: sizes, frame counts, fp32 and bf16, and an image whose top half is black (0.0, like the
padding frames), so the top rank's band repeats from the first chunks while the others' do not: only
the agreement keeps the ranks in step (a rank skipping a stage alone would skip its halo exchanges).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan

from wan_spmd.families import FAMILIES
from wan_spmd.parallel.vae import split_vae
from wan_spmd.process import finish_process
from wan_spmd.tiny import tiny_vae_config
from wan_spmd.vae_reuse import EncodeStats, encode_mode, reuse_encode_mode

CASES = [  # (name, height, width, frames, dtype, black top half)
    ("32x48x33-fp32", 32, 48, 33, torch.float32, False),
    ("48x32x21-bf16", 48, 32, 21, torch.bfloat16, False),
    ("64x32x25-fp32-black-top", 64, 32, 25, torch.float32, True),
]


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**tiny_vae_config(FAMILIES["wan2.2-i2v-a14b"])).eval()
    split = split_vae(vae, world, rank)
    saved = {}
    for name, height, width, frames, dtype, black_top in CASES:
        g = torch.Generator().manual_seed(7)
        image = torch.rand(1, 3, 1, height, width, generator=g) * 2 - 1
        if black_top:
            image[..., : height // 2, :] = 0.0
        video = torch.cat([image, torch.zeros(1, 3, frames - 1, height, width)], dim=2).to(dtype)
        vae.to(dtype)
        stats = EncodeStats()
        with torch.inference_mode():
            split.band_encoder = encode_mode
            full = split.encode(vae, video)
            split.band_encoder = functools.partial(reuse_encode_mode, agree=split.all_true, stats=stats)
            mine = split.encode(vae, video)
        saved[name] = {"full": full, "reuse": mine, "reused": stats.reused, "calls": stats.calls}
    if rank == 0:
        torch.save(saved, out / f"reuse-{world}.pt")
    dist.barrier()  # rank 0's file is written before any rank ends
    # not destroy_process_group/finalisation: gloo's threads then abort a rank now and then
    # (SIGABRT, "terminate called without an active exception"); finish_process says why
    finish_process(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
