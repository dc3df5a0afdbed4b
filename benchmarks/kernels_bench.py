"""Hopper kernels on the real A14B dimensions: attention backends and fp8 linears, time and error.

  python benchmarks/kernels_bench.py [--out DIR] [--budget-s 420] [--tiny]

Needs a Hopper GPU with the `hopper` extra installed (`pip install 'wan_spmd[hopper]'`: fa3-fwd,
torchao) and triton (it comes with CUDA torch). Sections, each timed with
`triton.testing.do_bench` (median), each skipped once the time budget is spent:

1. attention, batch 1, 40 heads x 128, at 32,760 tokens (832x480x81) and 75,600 (1280x720x81):
   sdpa (cuDNN), fa3 bf16, fa3-fp8 with and without the smoothing of k, the fp8 kernel alone and
   the q/k/v quantization alone; TFLOP/s; relL2 against sdpa and against an fp32 reference on
   the first 1024 query rows. Errors also on keys with a per-channel offset (Gaussian keys have
   none; real keys do), where smoothing should matter.
2. compile: the backends under torch.compile(fullgraph=True) (a graph break is an error there),
   at two sizes (the second compiles a dynamic-shape graph), against eager.
3. fp8 linears: the 8 planned linears of one block as a chain, and one real-size diffusers
   WanTransformerBlock (dim 5120, ffn 13824, random bf16 weights, std 0.02), compiled, bf16 vs
   `quantize_fp8`; per-module-group errors of the block (which groups could stay bf16).
4. a TP-sharded linear (a 1-rank mesh) through `quantize_fp8`'s DTensor path.

Writes kernels.json to --out; prints a short table last. `--tiny` runs small sizes on the CPU
(the FA3 op's CPU reference stands in for the kernel), to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import traceback
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from wan_spmd import kernels as K

HEADS, HEAD_DIM, DIM, FFN_DIM, TEXT_TOKENS = 40, 128, 5120, 13824, 512
SIZES = {"480p": (21, 30, 52), "720p": (21, 45, 80)}  # latent frames, h/2, w/2 after patching: 32,760 / 75,600 tokens
REF_ROWS = 1024


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def bench(fn, tiny: bool) -> float:
    """Median milliseconds."""
    if tiny:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=200, rep=1500, return_mode="median"))


def attention_flops(tokens_q: int, tokens_k: int, heads: int, head_dim: int) -> float:
    return 4.0 * tokens_q * tokens_k * heads * head_dim


def reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """Exact attention of the first `rows` queries in fp32 (no TF32), a few heads at a time."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        outs = []
        for h in range(0, q.shape[2], 8):
            qh = q[:, :rows, h : h + 8].float().transpose(1, 2)  # (B, h, rows, D)
            kh, vh = (t[:, :, h : h + 8].float().transpose(1, 2) for t in (k, v))
            scores = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
            outs.append((scores.softmax(-1) @ vh).transpose(1, 2))
        return torch.cat(outs, dim=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def qkv(tokens: int, heads: int, head_dim: int, device, seed: int, k_offset: float = 0.0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=gen, device=device) for _ in range(3))
    if k_offset:  # a per-(head, channel) mean shared by every token, as trained keys have
        k = k + k_offset * torch.randn(1, 1, heads, head_dim, generator=gen, device=device)
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


def section_attention(args, device, budget: Budget) -> dict:
    heads, head_dim = (4, 64) if args.tiny else (HEADS, HEAD_DIM)
    sizes = {"tiny-a": 256, "tiny-b": 384} if args.tiny else {k: math.prod(v) for k, v in SIZES.items()}
    variants = {
        "sdpa": K.sdpa,
        "fa3": K.fa3,
        "fa3-fp8": K.fa3_fp8,
        "fa3-fp8-nosmooth": K.fa3_fp8_unsmoothed,
    }
    result = {}
    for size, tokens in sizes.items():
        if budget.left() < 60:
            result[size] = "skipped: time budget"
            continue
        row: dict = {"tokens": tokens}
        q, k, v = qkv(tokens, heads, head_dim, device, seed=1)
        flops = attention_flops(tokens, tokens, heads, head_dim)
        ref = reference_rows(q, k, v, REF_ROWS)
        base = K.sdpa(q, k, v)
        for name, fn in variants.items():
            out = fn(q, k, v)
            ms = bench(partial(fn, q, k, v), args.tiny)
            row[name] = {
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "rel_l2_vs_sdpa": K.rel_l2(out, base),
                "rel_l2_vs_fp32_rows": K.rel_l2(out[:, :REF_ROWS], ref),
                "finite": bool(torch.isfinite(out).all()),
            }
            del out
        parts = K.quantize_qkv_fp8(q, k, v)
        row["quantize-only"] = {"ms": bench(partial(K._quantize_qkv, q, k, v), args.tiny)}
        row["fp8-kernel-only"] = {"ms": bench(partial(K.flash_attention, *parts), args.tiny)}
        del parts, base, ref
        if size in ("480p", "tiny-a"):  # keys with a per-channel offset: what smoothing is for
            for offset in (1.0, 4.0):
                q2, k2, v2 = qkv(tokens, heads, head_dim, device, seed=2, k_offset=offset)
                ref2 = reference_rows(q2, k2, v2, REF_ROWS)
                row[f"k_offset_{offset:g}"] = {
                    name: K.rel_l2(fn(q2, k2, v2)[:, :REF_ROWS], ref2) for name, fn in variants.items()
                }
                del q2, k2, v2, ref2
        result[size] = row
        del q, k, v
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return result


def section_compile(args, device, budget: Budget) -> dict:
    """fullgraph compile of each backend (with a projection around it, as in a block) at two sizes."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    heads, head_dim = (4, 64) if args.tiny else (HEADS, HEAD_DIM)
    sizes = (256, 384) if args.tiny else (math.prod(SIZES["480p"]), 4096 * 3)
    backend = "aot_eager" if args.tiny else "inductor"
    result = {}
    for name, fn in (("fa3", K.fa3), ("fa3-fp8", K.fa3_fp8)):
        if budget.left() < 45:
            result[name] = "skipped: time budget"
            continue
        torch._dynamo.reset()
        counters.clear()

        def block_like(q, k, v, fn=fn):
            q = q * 1.0  # something for inductor to fuse ahead of the op
            return fn(q, k, v).flatten(2) * 2.0

        compiled = torch.compile(block_like, fullgraph=True, backend=backend)
        row = {}
        try:
            for tokens in sizes:
                q, k, v = qkv(tokens, heads, head_dim, device, seed=3)
                t0 = time.perf_counter()
                out = compiled(q, k, v)
                first_s = time.perf_counter() - t0
                eager = block_like(q, k, v)
                row[str(tokens)] = {
                    "first_call_s": first_s,
                    "rel_l2_vs_eager": K.rel_l2(out, eager),
                    "compiled_ms": bench(partial(compiled, q, k, v), args.tiny),
                    "eager_ms": bench(partial(block_like, q, k, v), args.tiny),
                }
            row["graph_breaks"] = sum(counters["graph_break"].values())
            row["unique_graphs"] = int(counters["stats"]["unique_graphs"])
            row["fullgraph"] = "ok"
        except Exception as e:  # noqa: BLE001 - the report says what broke
            row["fullgraph"] = f"FAILED: {type(e).__name__}: {str(e)[:500]}"
        result[name] = row
    return result


def planned_linears_chain(device, dtype, tiny: bool) -> nn.Module:
    """The planned linears of one block (q, k, v, out of attn1; q, out of attn2; the FFN) as a
    `blocks` holder, so `quantize_fp8` and its plan apply as to an expert."""
    dim, ffn = (64, 128) if tiny else (DIM, FFN_DIM)

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.ModuleDict(
                {n: nn.Linear(dim, dim) for n in ("q1", "k1", "v1", "o1", "q2", "o2")}
                | {"f0": nn.Linear(dim, ffn), "f2": nn.Linear(ffn, dim)}
            )

        def forward(self, x):
            outs = [self.lin[n](x) for n in ("q1", "k1", "v1", "o1", "q2", "o2")]
            outs.append(self.lin["f2"](torch.nn.functional.gelu(self.lin["f0"](x), approximate="tanh")))
            return torch.stack(outs)

    chain = Chain().to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in chain.parameters():
            p.normal_(0, 0.02)
    return chain


def make_block(device, tiny: bool) -> nn.Module:
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    dim, ffn, heads = (128, 256, 4) if tiny else (DIM, FFN_DIM, HEADS)
    torch.manual_seed(5)
    block = WanTransformerBlock(dim, ffn, heads, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6)
    block = block.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name != "scale_shift_table":
                p.normal_(0, 0.02)
    return block


def block_inputs(device, grid: tuple[int, int, int], tiny: bool):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    dim, head_dim = (128, 32) if tiny else (DIM, HEAD_DIM)
    frames, h, w = grid
    gen = torch.Generator(device=device).manual_seed(6)
    hidden = torch.randn(1, frames * h * w, dim, generator=gen, device=device).to(torch.bfloat16)
    text = (torch.randn(1, TEXT_TOKENS, dim, generator=gen, device=device) * 0.5).to(torch.bfloat16)
    temb = (torch.randn(1, 6, dim, generator=gen, device=device) * 0.1).float()
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024).to(device)
    cos, sin = rope(torch.empty(1, 1, frames, 2 * h, 2 * w, device=device))
    return hidden, text, temb, (cos, sin)


class Holder(nn.Module):
    """One block as an expert's `blocks`, so the plan's block range covers it."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block])


def section_chain(args, device, budget: Budget) -> dict:
    """The planned linears alone, compiled, bf16 vs fp8."""
    import copy

    result: dict = {}
    dim = 64 if args.tiny else DIM
    for size, grid in ({"tiny": (2, 4, 8)} if args.tiny else SIZES).items():
        if budget.left() < 60:
            result[f"linears-{size}"] = "skipped: time budget"
            continue
        tokens = math.prod(grid)
        chain = planned_linears_chain(device, torch.bfloat16, args.tiny)
        x = torch.randn(1, tokens, dim, device=device, dtype=torch.bfloat16)
        ref = chain(x)
        bf16 = torch.compile(chain, fullgraph=True)
        row = {"bf16_ms": bench(partial(bf16, x), args.tiny)}
        if not args.tiny:
            chain8 = copy.deepcopy(chain)
            holder = nn.Module()
            holder.blocks = nn.ModuleList([chain8])
            plan = K.QuantPlan(modules=tuple(f"lin.{n}" for n in chain.lin), keep_first_blocks=0, keep_last_blocks=0)
            report = K.quantize_fp8(holder, plan)
            fp8 = torch.compile(chain8, fullgraph=True)
            row |= {
                "fp8_ms": bench(partial(fp8, x), args.tiny),
                "rel_l2": K.rel_l2(fp8(x), ref),
                "quantized": report.quantized,
                "bytes": [report.bytes_before, report.bytes_after],
            }
        result[f"linears-{size}"] = row
        del chain, x, ref
    return result


def section_block(args, device, budget: Budget, sizes: tuple[str, ...]) -> dict:
    """One real-size WanTransformerBlock, compiled, bf16 vs `quantize_fp8`; group errors at 480p."""
    import copy

    one_block = K.QuantPlan(modules=K.FP8_PLAN.modules, keep_first_blocks=0, keep_last_blocks=0)
    result: dict = {}
    grids = {"tiny": (2, 4, 8)} if args.tiny else {s: SIZES[s] for s in sizes}
    for size, grid in grids.items():
        if budget.left() < 120:
            result[f"block-{size}"] = "skipped: time budget"
            continue
        block = make_block(device, args.tiny)
        inputs = block_inputs(device, grid, args.tiny)
        ref = block(*inputs)
        row = {"tokens": math.prod(grid)}
        compiled = torch.compile(block, fullgraph=True)
        row["bf16_compiled_ms"] = bench(partial(compiled, *inputs), args.tiny)
        if not args.tiny:
            block8 = copy.deepcopy(block)
            report = K.quantize_fp8(Holder(block8), one_block)
            row["fp8_eager_rel_l2"] = K.rel_l2(block8(*inputs), ref)
            compiled8 = torch.compile(block8, fullgraph=True)
            out8 = compiled8(*inputs)
            row |= {
                "fp8_compiled_ms": bench(partial(compiled8, *inputs), args.tiny),
                "fp8_compiled_rel_l2": K.rel_l2(out8, ref),
                "bf16_compiled_rel_l2": K.rel_l2(compiled(*inputs), ref),
                "report": report.summary(),
                "block_bytes": [report.bytes_before, report.bytes_after],
            }
            del block8, compiled8, out8
            if size in ("480p", "tiny"):  # which groups cost how much error (eager: no compile to pay)
                groups = {
                    "attn1": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
                    "attn2_q_out": ("attn2.to_q", "attn2.to_out.0"),
                    "attn2_text_kv": ("attn2.to_k", "attn2.to_v"),
                    "ffn": ("ffn.net.0.proj", "ffn.net.2"),
                    "plan": K.FP8_PLAN.modules,
                    "plan+text_kv": (*K.FP8_PLAN.modules, "attn2.to_k", "attn2.to_v"),
                }
                row["group_rel_l2"] = {}
                for gname, mods in groups.items():
                    b = copy.deepcopy(block)
                    K.quantize_fp8(Holder(b), K.QuantPlan(modules=mods, keep_first_blocks=0, keep_last_blocks=0))
                    row["group_rel_l2"][gname] = K.rel_l2(b(*inputs), ref)
                    del b
        result[f"block-{size}"] = row
        del block, inputs, ref, compiled
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return result


def section_sharded(args, device, budget: Budget) -> dict:
    """`quantize_fp8` on a ColwiseParallel/RowwiseParallel pair over a 1-rank mesh (DTensor weights)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if args.tiny:
        return {"skipped": "GPU only"}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        chain = nn.Sequential(nn.Linear(DIM, FFN_DIM), nn.GELU(), nn.Linear(FFN_DIM, DIM))
        chain = chain.to(device=device, dtype=torch.bfloat16).requires_grad_(False)
        with torch.no_grad():
            for p in chain.parameters():
                p.normal_(0, 0.02)
        x = torch.randn(1, 4096, DIM, device=device, dtype=torch.bfloat16)
        ref = chain(x)
        parallelize_module(chain, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        holder = nn.Module()
        holder.blocks = nn.ModuleList([chain])
        report = K.quantize_fp8(holder, K.QuantPlan(modules=("0", "2"), keep_first_blocks=0, keep_last_blocks=0))
        out = chain(x)
        return {
            "rel_l2": K.rel_l2(out, ref),
            "weight_type": type(chain[0].weight.data).__name__,
            "local_type": type(chain[0].weight.to_local()).__name__,
            "report": report.summary(),
        }
    finally:
        dist.destroy_process_group()


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("fa3-fwd", "torchao", "diffusers", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        out["card"] = torch.cuda.get_device_name()
        out["capability"] = "sm{}{}".format(*torch.cuda.get_device_capability())
        out["cuda"] = torch.version.cuda
    return out


def table(results: dict) -> str:
    lines = []
    for size, row in results.get("attention", {}).items():
        if not isinstance(row, dict):
            continue
        lines.append(f"attention {size} ({row['tokens']} tokens)")
        for name in ("sdpa", "fa3", "fa3-fp8", "fa3-fp8-nosmooth"):
            r = row[name]
            lines.append(
                f"  {name:18s} {r['ms']:9.2f} ms {r['tflops']:6.0f} TFLOP/s  relL2 vs sdpa {r['rel_l2_vs_sdpa']:.2e}"
                f"  vs fp32 {r['rel_l2_vs_fp32_rows']:.2e}"
            )
        quant, kernel = row["quantize-only"]["ms"], row["fp8-kernel-only"]["ms"]
        lines.append(f"  quantize-only {quant:.2f} ms; fp8 kernel {kernel:.2f} ms")
        for key in (k for k in row if k.startswith("k_offset")):
            lines.append(f"  {key}: " + ", ".join(f"{n} {e:.2e}" for n, e in row[key].items()))
    for name, row in results.get("compile", {}).items():
        lines.append(f"compile {name}: {row if isinstance(row, str) else {k: v for k, v in row.items()}}")
    for section in ("block480", "linears", "block720"):
        for name, row in results.get(section, {}).items():
            lines.append(f"{name}: {row}")
    if "sharded" in results:
        lines.append(f"sharded: {results['sharded']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("kernels-bench"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections once this is spent")
    parser.add_argument("--tiny", action="store_true", help="small sizes on the CPU: checks the script only")
    parser.add_argument("--sections", default="attention,compile,block480,linears,sharded,block720")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    budget = Budget(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"versions": versions(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(os.sys.argv)}
    if not args.tiny:
        fn, reason = K.select_attention("auto", device)
        results["auto"] = reason
    sections = {
        "attention": section_attention,
        "compile": section_compile,
        "block480": lambda *a: section_block(*a, sizes=("480p",)),
        "linears": section_chain,
        "sharded": section_sharded,
        "block720": lambda *a: section_block(*a, sizes=("720p",)),
    }
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                results[name] = sections[name](args, device, budget)
        except Exception as e:  # noqa: BLE001 - keep the other sections' numbers
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            print(results[name]["trace"], flush=True)
        results.setdefault("section_s", {})[name] = time.perf_counter() - t0
        (args.out / "kernels.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"[{name}] done in {results['section_s'][name]:.1f} s, {budget.left():.0f} s of budget left", flush=True)
    print(json.dumps(results["versions"]), flush=True)
    print(results.get("auto"), flush=True)
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
