"""Tensor-parallel benchmark on GPUs: dummy weights, the real Wan2.2-I2V-A14B configuration.

Run once per variant under torchrun (see benchmarks/run_tp_bench.sh):
  torchrun --nproc-per-node N benchmarks/tp_bench.py --variant NAME [--compile] --out DIR

Each run loads both experts, the text encoder and the VAE with `--load-format dummy`, then times
on rank 0 (all ranks synchronised): one transformer forward and one CFG step (two forwards and a
scheduler step) at 1280x720x81 and 832x480x81, text encoding and, with N > 1, the broadcasts that
placing the text encoder or VAE on rank 0 alone would need. It saves each forward's output so
`--compare` can give the relative L2 of TP=2 against TP=1 on the same dummy weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

LAUNCH_T0 = float(os.environ.get("LAUNCH_T0", time.time()))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SIZES = {"720p": (1280, 720, 81), "480p": (832, 480, 81)}


def timed(fn, d, repeats: int) -> list[float]:
    """Seconds per call, all ranks synchronised before and after."""
    times = []
    for _ in range(repeats):
        if d.world_size > 1:
            dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if d.world_size > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    from wan_spmd.config import REAL_MODELS
    from wan_spmd.engine import EngineOptions, build_pipeline
    from wan_spmd.launch import resolve_layout
    from wan_spmd.params import GenerationParams, decode_image
    from wan_spmd.process import setup_logging, torchrun_env
    from wan_spmd.runtime import init_dist, shutdown

    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True)
    parser.add_argument("--compile", action="store_true", help="compile the experts' blocks, as serve does on CUDA")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="720p,480p")
    parser.add_argument("--vae", action="store_true", help="also time a 720p VAE encode (needs the memory)")
    args = parser.parse_args()
    rank, _, _ = torchrun_env()
    setup_logging(rank)
    d = init_dist("cuda")
    info = REAL_MODELS["wan2.2-i2v-a14b"]
    options = EngineOptions(layout=resolve_layout(d.world_size), load_format="dummy", compile=args.compile)
    pipe = build_pipeline(d, info, options)
    torch.cuda.synchronize()
    if d.world_size > 1:
        dist.barrier()
    result: dict = {
        "variant": args.variant,
        "world_size": d.world_size,
        "sequence_regions": d.world_size > 1,
        "compiled": args.compile,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "launch_to_ready_s": time.time() - LAUNCH_T0,
        "loaded_gib": torch.cuda.memory_allocated() / 2**30,
    }
    transformer = pipe.experts[0]  # the high-noise expert in its layout (parallel.ParallelExpert)
    dtype = pipe.transformer_dtype
    gen = torch.Generator("cpu").manual_seed(0)
    embeds = (torch.randn(1, 512, 4096, generator=gen) * 0.5).to("cuda", dtype)
    negative = (torch.randn(1, 512, 4096, generator=gen) * 0.5).to("cuda", dtype)

    # Text encoder placement: every rank encodes (no communication) vs rank 0 + a broadcast.
    result["text_encoding_s"] = statistics.median(timed(lambda: pipe.encode_prompt("a kite over a hill"), d, 3))
    if d.world_size > 1:
        buf = torch.empty(1, 512, 4096, device="cuda", dtype=dtype)
        result["broadcast_embeds_s"] = statistics.median(timed(lambda: dist.broadcast(buf, 0), d, 5))
        cond = torch.empty(1, 20, 21, 90, 160, device="cuda", dtype=torch.float32)  # 720p I2V condition
        result["broadcast_condition_720p_s"] = statistics.median(timed(lambda: dist.broadcast(cond, 0), d, 5))

    for size in args.sizes.split(","):
        width, height, frames = SIZES[size]
        lat = (torch.randn(1, 36, (frames - 1) // 4 + 1, height // 8, width // 8, generator=gen)).to("cuda", dtype)
        t = torch.tensor([999.0], device="cuda")

        def forward(lat=lat, t=t):
            return transformer(lat, t, embeds)

        with torch.inference_mode():
            out = forward()  # warm-up (and the first call's compilation of the fused q/k norm)
            times = timed(forward, d, args.repeats)
            if d.is_main:
                torch.save(out.float().cpu(), args.out / f"out-{args.variant}-{size}.pt")
            noise = lat[:, :16].float()
            condition = lat[:, 16:].float()

            one_step = GenerationParams("x", "", None, width, height, frames, 16, 1, 3.5, 3.5, 0.9, 5.0, 0)

            def cfg_step(noise=noise, condition=condition, p=one_step):
                return pipe.denoise(p, noise, condition, embeds, negative)

            cfg_times = timed(cfg_step, d, 1)
        result[f"forward_{size}_s"] = statistics.median(times)
        result[f"forward_{size}_all_s"] = times
        result[f"cfg_step_{size}_s"] = cfg_times[0]
        result[f"peak_{size}_gib"] = torch.cuda.max_memory_allocated() / 2**30

    if args.vae and d.is_main:
        vae_p = GenerationParams("x", "", decode_image(_png(1280, 720)), 1280, 720, 81, 16, 1, 3.5, 3.5, 0.9, 5.0, 0)
        result["vae_encode_720p_s"] = statistics.median(timed(lambda: pipe.image_condition(vae_p), _Solo(), 1))
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    peaks = [None] * d.world_size
    if d.world_size > 1:
        dist.all_gather_object(peaks, result["peak_gib"])
    else:
        peaks = [result["peak_gib"]]
    result["peak_gib_per_rank"] = peaks
    if d.is_main:
        (args.out / f"result-{args.variant}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    shutdown(d)


class _Solo:
    world_size = 1


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, "PNG")
    return buf.getvalue()


def compare(out: Path, base: str, others: list[str]) -> None:
    """Relative L2 of each variant's forward output against the base variant's."""
    for size in SIZES:
        ref_path = out / f"out-{base}-{size}.pt"
        if not ref_path.exists():
            continue
        ref = torch.load(ref_path)
        for name in others:
            path = out / f"out-{name}-{size}.pt"
            if path.exists():
                got = torch.load(path)
                rel = ((got - ref).norm() / ref.norm()).item()
                print(json.dumps({"compare": f"{name} vs {base}", "size": size, "rel_l2": rel}))


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "--compare":
        compare(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        main()
