"""One GPU, side by side with diffusers: transformer forwards and diffusers' whole request.

  python benchmarks/gpu1_bench.py forward --out DIR [--sizes 480p,720p] [--repeats 3]
  python benchmarks/gpu1_bench.py diffusers --out DIR

Both build the real Wan2.2-I2V-A14B configuration with random bf16 weights straight on the GPU
(wan_spmd's `--load-format dummy` builder) and hand the same modules to each side, so only the code
around them differs.

`forward`: the card's bf16 matmul rate on random data; then one transformer forward per size:
diffusers eager and after `compile_repeated_blocks(fullgraph=True)` (expert 1), and wan_spmd's
`compile_blocks` (expert 2, the same architecture); achieved model TFLOP/s from an operation count.

`diffusers`: diffusers' own `WanImageToVideoPipeline.__call__` for vllm-omni's CI case (832x480x81,
4 steps, guidance 3.5/3.5, Wan's negative prompt) and PR #1715's (1280x720x81, 1 step), eager, then
compiled (first call, with its compile, and a warm call); its frames written by wan_spmd's own mp4
writer, timed apart, so the writer is not what is compared.

`--tiny` runs either on the tiny model (CPU dry run of the code path, no numbers worth keeping).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import torch

SIZES = {"480p": (832, 480, 81), "720p": (1280, 720, 81)}
CASES = {  # name: (width, height, frames, steps): vllm-omni's CI case and its PR #1715's
    "480p-4step": (832, 480, 81, 4),
    "720p-1step": (1280, 720, 81, 1),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def matmul_tflops(device: torch.device) -> float:
    """The card's bf16 matmul rate on random data (8192^3, median of 20)."""
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = timed(lambda: a @ b, 20)
    return 2 * n**3 / statistics.median(times) / 1e12


def forward_flops(config: dict, tokens: int, text_tokens: int = 512) -> float:
    """Matmul FLOPs of one forward (multiply-adds x 2): per block q/k/v/o, attention, cross-attention
    (q/o on the video tokens, k/v on the text) and the FFN; the embeddings and norms are noise."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    ffn, s, t = config["ffn_dim"], tokens, text_tokens
    self_attn = 4 * 2 * s * d * d + 2 * 2 * s * s * d
    cross_attn = 2 * 2 * s * d * d + 2 * 2 * t * d * d + 2 * 2 * s * t * d
    return config["num_layers"] * (self_attn + cross_attn + 2 * 2 * s * d * ffn)


def load(tiny: bool, device: torch.device):
    from wan_spmd.config import REAL_MODELS
    from wan_spmd.launch import resolve_model
    from wan_spmd.models import load_components
    from wan_spmd.tiny import quiet_hub_logging

    quiet_hub_logging()
    info = resolve_model("tiny") if tiny else REAL_MODELS["wan2.2-i2v-a14b"]
    start = time.perf_counter()
    comps = load_components(info, device, load_format="auto" if tiny else "dummy")
    sync()
    return info, comps, time.perf_counter() - start


def bench_forward(args, device: torch.device) -> dict:
    from wan_spmd.compiling import compile_blocks

    info, comps, load_s = load(args.tiny, device)
    result: dict = {"load_s": load_s, "bf16_matmul_tflops": None if args.tiny else matmul_tflops(device)}
    config = info.transformer_config
    dtype = next(comps.transformer.parameters()).dtype
    gen = torch.Generator("cpu").manual_seed(0)
    text_dim = config["text_dim"]
    embeds = (torch.randn(1, 512, text_dim, generator=gen) * 0.5).to(device, dtype)
    sizes = {"tiny": (64, 64, 9)} if args.tiny else {k: SIZES[k] for k in args.sizes.split(",")}
    inputs = {}
    for name, (width, height, frames) in sizes.items():
        shape = (1, config["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)
        inputs[name] = torch.randn(shape, generator=gen).to(device, dtype)

    def run(model, name):
        t = torch.tensor([999.0], device=device)
        return lambda: model(hidden_states=inputs[name], timestep=t, encoder_hidden_states=embeds, return_dict=False)

    backend = "aot_eager" if args.tiny else "inductor"
    variants = (
        ("diffusers_eager", comps.transformer, None),
        ("diffusers_compiled", comps.transformer, lambda m: m.compile_repeated_blocks(fullgraph=True, backend=backend)),
        ("wan_spmd_compiled", comps.transformer_2, lambda m: compile_blocks(m, backend)),
    )
    with torch.inference_mode():
        for variant, model, compile_fn in variants:
            if compile_fn is not None:
                compile_fn(model)
            for name in sizes:
                first = timed(run(model, name), 1)[0]  # includes a compile for compiled variants
                times = timed(run(model, name), args.repeats)
                width, height, frames = sizes[name]
                tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
                median = statistics.median(times)
                result[f"{variant}_{name}"] = {
                    "first_s": first,
                    "median_s": median,
                    "all_s": times,
                    "tflops": forward_flops(config, tokens) / median / 1e12,
                }
                print(json.dumps({variant: name, "first_s": round(first, 3), "median_s": round(median, 3)}), flush=True)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return result


def image_png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, "PNG")
    return buf.getvalue()


def bench_diffusers(args, device: torch.device, out: Path) -> dict:
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from wan_spmd.config import generation_defaults
    from wan_spmd.video import write_mp4

    info, comps, load_s = load(args.tiny, device)
    pipe = WanImageToVideoPipeline(
        tokenizer=comps.tokenizer,
        text_encoder=comps.text_encoder,
        vae=comps.vae,
        scheduler=comps.scheduler,
        transformer=comps.transformer,
        transformer_2=comps.transformer_2,
        image_encoder=None,
        image_processor=None,
        boundary_ratio=info.boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    negative = generation_defaults(info)["negative_prompt"] if not args.tiny else "blurry"
    cases = {"tiny": (64, 64, 9, 2)} if args.tiny else CASES
    result: dict = {"load_s": load_s}

    def call(name):
        width, height, frames, steps = cases[name]
        image = Image.open(io.BytesIO(image_png(width, height))).convert("RGB")
        sync()
        start = time.perf_counter()
        video = pipe(
            image=image,
            prompt="a kite over a green hill",
            negative_prompt=negative,
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=3.5,
            guidance_scale_2=3.5,
            generator=torch.Generator("cpu").manual_seed(1),
            output_type="np",
        ).frames[0]
        sync()
        call_s = time.perf_counter() - start
        start = time.perf_counter()
        frames_u8 = (video * 255).round().astype("uint8")  # as diffusers' numpy_to_pil rounds
        write_mp4(frames_u8, out / f"diffusers-{name}.mp4", 16)
        writer_s = time.perf_counter() - start
        return {"call_s": call_s, "writer_s": writer_s, "call_plus_writer_s": call_s + writer_s}

    with torch.inference_mode():
        for name in cases:
            result[f"eager_{name}"] = call(name)
            print(json.dumps({"eager": name, **result[f"eager_{name}"]}), flush=True)
        backend = "aot_eager" if args.tiny else "inductor"
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
        pipe.transformer_2.compile_repeated_blocks(fullgraph=True, backend=backend)
        for name in cases:
            result[f"compiled_first_{name}"] = call(name)
            result[f"compiled_warm_{name}"] = call(name)
            print(json.dumps({"compiled": name, **result[f"compiled_warm_{name}"]}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("forward", "diffusers"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="480p,720p")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on this machine's device (dry run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = bench_forward(args, device) if args.what == "forward" else bench_diffusers(args, device, args.out)
    import diffusers

    result["versions"] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    (args.out / f"{args.what}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
