"""--vae-dtype on a GPU: the Wan VAE's decode of one 1280x720x81 video in fp32 and bf16, through the
pipeline's own chunked decode; time (median of 2 after a warm-up) and PSNR of bf16's 8-bit frames
against fp32's (random weights: an indication only, not a quality verdict).

  python benchmarks/vae_dtype.py --out DIR [--size 1280x720] [--frames 81]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    from diffusers import AutoencoderKLWan

    from wan_spmd.config import REAL_MODELS
    from wan_spmd.models import Components
    from wan_spmd.pipeline import WanVideoPipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the code path at a small size")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    info = REAL_MODELS["wan2.2-i2v-a14b"]
    torch.manual_seed(4)
    weights = AutoencoderKLWan().state_dict()  # the Wan2.1 VAE's default arguments, as dummy loading makes it
    # only the VAE is used: the decode seam reads nothing else (placeholders keep the family's expert count)
    comps = Components(None, None, None, None, [torch.nn.Identity(), torch.nn.Identity()])
    latents = torch.randn(
        1, 16, (args.frames - 1) // 4 + 1, height // 8, width // 8, generator=torch.Generator().manual_seed(0)
    )
    latents = latents.to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result: dict = {"size": args.size, "frames": args.frames, "device": name}
    frames = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        vae = AutoencoderKLWan().to(device=device, dtype=dtype)
        vae.load_state_dict(weights)
        comps.vae = vae
        pipe = WanVideoPipeline(comps, info, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            sync()
            start = time.perf_counter()
            out = torch.cat([c for c in pipe.decode_chunks(latents)])
            sync()
            times.append(time.perf_counter() - start)
        frames[name] = out.double()
        result[f"decode_{name}_s"] = statistics.median(times[1:])
        if device.type == "cuda":
            result[f"peak_{name}_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del vae
    mse = ((frames["fp32"] - frames["bf16"]) ** 2).mean().item()
    result["psnr_bf16_vs_fp32_db"] = 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()
    result["mean_abs_steps"] = (frames["fp32"] - frames["bf16"]).abs().mean().item()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_dtype.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
