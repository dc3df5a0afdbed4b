"""The I2V condition's VAE encode with exact reuse (`wan_spmd.vae_reuse`) against diffusers' full
encode, on the A14B VAE's real dimensions (`AutoencoderKLWan()`'s default arguments, random weights).

First a check that the device's convolutions are deterministic for repeated identical calls (reuse
is exact only if they are): a full-resolution 3x3x3 causal conv of the encoder called twice on one
input and once on a copy at another address, and the whole encode twice; then, per dtype and size,
the condition video (a random image, then black frames) encoded both ways: time (median of
`--repeats` after a warm-up), peak memory, bitwise equality of the latents, stages reused.

  python benchmarks/vae_encode_reuse.py --out DIR                      # GPU: 832x480x81, 1280x720x81
  python benchmarks/vae_encode_reuse.py --device cpu --tiny            # dry run of the code path
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from wan_spmd.vae_reuse import EncodeStats, bits_equal, reuse_encode_mode


def condition_video(width: int, height: int, frames: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 3, F, H, W): a random image in [-1, 1] then zeros, as the pipeline's image_condition makes it."""
    image = torch.rand(1, 3, 1, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    video = torch.cat([image, torch.zeros(1, 3, frames - 1, height, width)], dim=2)
    return video.to(device=device, dtype=dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(bits_equal(a, b))


def determinism(vae, video: torch.Tensor) -> dict:
    """Repeated identical calls: the encoder's first full-resolution block conv (input and cache as
    in a steady chunk), same tensor twice and a copy; and the whole encode twice."""
    conv = vae.encoder.down_blocks[0].conv1
    conv = getattr(conv, "conv", conv)
    channels = conv.in_channels
    _, _, _, height, width = video.shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, channels, 4, height, width, generator=g).to(video)
    cache = torch.randn(1, channels, 2, height, width, generator=g).to(video)
    with torch.inference_mode():
        first = conv(x, cache)
        again = conv(x, cache)
        copied = conv(x.clone(), cache.clone())
        whole_1 = vae.encode(video).latent_dist.mode()
        whole_2 = vae.encode(video).latent_dist.mode()
    return {
        "conv_same_tensor_twice_bitwise": same(first, again),
        "conv_copy_bitwise": same(first, copied),
        "conv_copy_max_abs_diff": (first.float() - copied.float()).abs().max().item(),
        "encode_twice_bitwise": same(whole_1, whole_2),
        "encode_twice_max_abs_diff": (whole_1.float() - whole_2.float()).abs().max().item(),
    }


def timed(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor, float | None]:
    """(median seconds of `repeats` after one warm-up, the last result, peak GiB or None)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    out = None
    for i in range(repeats + 1):
        if device.type == "cuda" and i == repeats:
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        sync()
        if i:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), out, peak


def measure(vae, video: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """Determinism, then the full encode and the reusing one: times, peaks, equality, reuse counts."""
    run: dict = {"determinism": determinism(vae, video)}
    full_s, full, full_peak = timed(lambda: vae.encode(video).latent_dist.mode(), device, repeats)
    stats = EncodeStats()
    reuse_s, mine, reuse_peak = timed(lambda: reuse_encode_mode(vae, video, stats=stats), device, repeats)
    run.update(
        full_s=round(full_s, 4),
        reuse_s=round(reuse_s, 4),
        reuse_over_full=round(reuse_s / full_s, 3),
        bitwise_equal=same(full, mine),
        max_abs_diff=(full.float() - mine.float()).abs().max().item(),
        stage_calls=stats.calls,
        stage_calls_reused=stats.reused,
        reused_by_stage={s.name: f"{s.reused}/{s.calls}" for s in stats.stages},
        held_gib=round(stats.held_bytes / 2**30, 3),
        peak_full_gib=None if full_peak is None else round(full_peak, 2),
        peak_reuse_gib=None if reuse_peak is None else round(reuse_peak, 2),
    )
    return run


def main() -> None:
    from diffusers import AutoencoderKLWan

    from wan_spmd.families import FAMILIES
    from wan_spmd.tiny import tiny_vae_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="write vae_encode_reuse.json here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny VAE at small sizes (a dry run on the CPU)")
    parser.add_argument("--sizes", default=None, help="WxH,WxH (default 832x480,1280x720; --tiny: 32x32,48x32)")
    parser.add_argument("--frames", type=int, default=None, help="default 81 (--tiny: 17)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = args.sizes or ("32x32,48x32" if args.tiny else "832x480,1280x720")
    frames = args.frames or (17 if args.tiny else 81)
    torch.manual_seed(4)
    config = tiny_vae_config(FAMILIES["wan2.2-i2v-a14b"]) if args.tiny else {}
    weights = AutoencoderKLWan(**config).state_dict()
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "vae": "tiny" if args.tiny else "A14B (AutoencoderKLWan defaults, random weights)",
        "frames": frames,
        "runs": [],
    }
    for dtype_name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        vae = AutoencoderKLWan(**config).to(device=device, dtype=dtype).eval()
        vae.load_state_dict(weights)
        for size in sizes.split(","):
            width, height = (int(v) for v in size.split("x"))
            video = condition_video(width, height, frames, dtype, device)
            run = {"dtype": dtype_name, "size": size, **measure(vae, video, device, args.repeats)}
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            del video
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vae_encode_reuse.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
