"""The experts' forward per attention backend and quant mode, on one GPU, through wan_spmd's own path.

  python benchmarks/attention_bench.py --out DIR [--sizes 480p,720p] [--repeats 2] [--budget-s 420]
  python benchmarks/attention_bench.py --tiny --device cpu --out DIR     # dry run of the code path

Builds the real Wan2.2-I2V-A14B expert with random bf16 weights on the GPU (`--load-format dummy`),
then for each variant: `parallelize(expert, mesh, attend)` with the backend `select_attention`
gives, `quantize_fp8` for the fp8-linear variant (last: it changes the weights in place), the blocks
compiled as serving compiles them (`compile_blocks`, inductor), and one transformer forward per size
(first call with its compile, then the median of the repeats). Each output is compared with the
sdpa/bf16 variant's on the same inputs (relL2), and each variant's peak allocated memory is kept.
dynamo's caches are reset between variants, so each compiles its own graphs.

Needs the `hopper` extra (`pip install 'wan_spmd[hopper]'`) for the FA3 and fp8 rows; a row whose
kernel cannot run is recorded with its reason, not measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

SIZES = {"480p": (832, 480, 81), "720p": (1280, 720, 81), "tiny": (64, 64, 9)}
VARIANTS = (  # (name, --attention, --quant)
    ("sdpa", "sdpa", "none"),
    ("fa3", "fa3", "none"),
    ("fa3-fp8", "fa3-fp8", "none"),
    ("fa3-fp8+fp8-linears", "fa3-fp8", "fp8"),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "fa3-fwd", "torchao", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="480p,720p")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the variants left once this is spent")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (a dry run of the code path)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    device = torch.device(args.device)

    from wan_spmd.compiling import compile_blocks
    from wan_spmd.config import REAL_MODELS
    from wan_spmd.kernels import KernelUnavailable, quantize_fp8, select_attention
    from wan_spmd.launch import ParallelLayout, resolve_model
    from wan_spmd.models import Dtypes, load_components
    from wan_spmd.parallel import build_mesh, parallelize
    from wan_spmd.tiny import quiet_hub_logging

    quiet_hub_logging()
    info = resolve_model("tiny") if args.tiny else REAL_MODELS["wan2.2-i2v-a14b"]
    start = time.perf_counter()
    comps = load_components(info, device, Dtypes.for_device(device), load_format="auto" if args.tiny else "dummy")
    sync(device)
    result: dict = {"versions": versions(), "load_s": time.perf_counter() - start, "rows": {}}
    expert = comps.transformer
    del comps  # one expert is measured: the other, the text encoder and the VAE leave room (80 GB cards)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    config = info.transformer_config
    dtype = next(expert.parameters()).dtype
    mesh = build_mesh(ParallelLayout(), device)
    gen = torch.Generator("cpu").manual_seed(0)
    embeds = (torch.randn(1, 512, config["text_dim"], generator=gen) * 0.5).to(device, dtype)
    sizes = ["tiny"] if args.tiny else args.sizes.split(",")
    inputs = {}
    for name in sizes:
        width, height, frames = SIZES[name]
        shape = (1, config["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)
        inputs[name] = torch.randn(shape, generator=gen).to(device, dtype)
    t = torch.tensor([999.0], device=device)
    reference: dict[str, torch.Tensor] = {}
    backend = "aot_eager" if args.tiny else "inductor"

    for variant, attention, quant in VARIANTS:
        row: dict = {"attention": attention, "quant": quant}
        result["rows"][variant] = row
        if time.perf_counter() - began > args.budget_s:
            row["skipped"] = "time budget spent"
            continue
        try:
            attend, reason = select_attention(attention, device)
        except KernelUnavailable as exc:
            row["skipped"] = str(exc)
            print(json.dumps({variant: row}), flush=True)
            continue
        row["selected"] = reason
        torch._dynamo.reset()
        if quant == "fp8":
            try:
                row["quant_report"] = quantize_fp8(expert).summary()
            except Exception as exc:  # torchao missing or a kernel it lacks: recorded, not measured
                row["skipped"] = f"quantize_fp8: {type(exc).__name__}: {exc}"
                print(json.dumps({variant: row}), flush=True)
                continue
        par = parallelize(expert, mesh, attend)
        compile_blocks(par, backend)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for name in sizes:
            call = lambda name=name, par=par: par(inputs[name], t, embeds)  # noqa: E731
            sync(device)
            s = time.perf_counter()
            out = call()
            sync(device)
            first = time.perf_counter() - s
            times = []
            for _ in range(args.repeats):
                sync(device)
                s = time.perf_counter()
                out = call()
                sync(device)
                times.append(time.perf_counter() - s)
            cell = {"first_s": first, "median_s": statistics.median(times), "all_s": times}
            if variant == "sdpa":
                reference[name] = out
            elif name in reference:
                cell["rel_l2_vs_sdpa"] = rel_l2(out, reference[name])
            row[name] = cell
        if device.type == "cuda":
            row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for name in sizes:
            if "sdpa" in result["rows"] and name in result["rows"]["sdpa"] and variant != "sdpa":
                row[name]["ratio_vs_sdpa"] = row[name]["median_s"] / result["rows"]["sdpa"][name]["median_s"]
        print(json.dumps({variant: row}), flush=True)
        (args.out / "attention.json").write_text(json.dumps(result, indent=2))
    result["total_s"] = time.perf_counter() - began
    (args.out / "attention.json").write_text(json.dumps(result, indent=2))
    print(f"{'variant':24} " + " ".join(f"{n:>22}" for n in sizes))
    for variant, row in result["rows"].items():
        cells = []
        for n in sizes:
            c = row.get(n)
            cells.append(
                f"{c['median_s']:7.3f}s x{c.get('ratio_vs_sdpa', 1.0):.3f} e{c.get('rel_l2_vs_sdpa', 0.0):.1e}"
                if c
                else f"{row.get('skipped', '-')[:22]:>22}"
            )
        print(f"{variant:24} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
