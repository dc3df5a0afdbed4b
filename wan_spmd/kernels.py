"""Attention kernels and fp8 linears for Hopper: FA3 (bf16, fp8) behind one attention signature,
and torchao's fp8 rowwise linears on the experts' weights.

Imported lazily (it imports torch); the torch-free modules never import it.

Attention backends are callables `fn(query, key, value) -> out`, every tensor (batch, seq, heads,
head_dim) (`AttentionFn`): the layout of diffusers' Wan attention processor and of our Ulysses
processor, so one backend serves self- and cross-attention, a TP rank's heads, and the heads a
Ulysses rank holds after its all-to-all.

- `sdpa`: torch's scaled_dot_product_attention (cuDNN on Hopper): exact, everywhere.
- `fa3`: FlashAttention-3's bf16 forward (the `fa3-fwd` package, import name `fa3_fwd`, kernels
  in `fa3_fwd._C` as `torch.ops.fa3_fwd.fwd`). Hopper (sm90) only, bf16 only (the wheel is built
  without fp16).
- `fa3-fp8`: q, k, v quantized to e4m3 with one scale per (batch, head), FA3's fp8 path with the
  descale factors. k is smoothed first (its mean over tokens subtracted: softmax is unchanged,
  since q.mean(k) is the same for every key of a query, and the values to quantize shrink);
  `benchmarks/kernels_bench.py` measures what smoothing does to the error.

FA3 is called through the custom op `wan_spmd::flash_attention` (`torch.library.custom_op`) with
a fake implementation, so a compiled block traces it as one opaque node: no graph break, and the
fp8 quantization around it is fused by inductor. A CPU kernel of the same op (dequantize, then
SDPA in fp32) is the reference the tests check the op's contract against.

Where the lead wires these (the call points):
- `--attention auto|sdpa|fa3|fa3-fp8`: once per process, after the device is known and before the
  experts are compiled: `fn, reason = select_attention(flag, device)`; hand `fn` to the attention
  seam (`wan_spmd.attention`, whose `AttentionFn` and `sdpa` have this signature) for attn1 and
  attn2 of every block, and put `reason` on the ready line. An explicit backend that cannot run
  raises `KernelUnavailable` (one line, exit 2 at the CLI).
- `--quant fp8`: per rank, per expert, after the expert is loaded with its LoRAs fused and after
  parallelize has cut its TP slices, before `compile_blocks`: `report = quantize_fp8(expert)`;
  the ready line gets `report.summary()` (the experts' weight bytes before and after).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wan_spmd.attention import AttentionFn, sdpa  # the seam's signature, and SDPA as diffusers calls it

log = logging.getLogger("wan_spmd")

ATTENTION_CHOICES = ("auto", "sdpa", "fa3", "fa3-fp8")
HOPPER_EXTRA = "pip install 'wan_spmd[hopper]'"
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
CHECK_TOLERANCE = {"fa3": 2e-2, "fa3-fp8": 1e-1}
"""relL2 against SDPA on the start-up check case, past which a backend is refused: bf16 kernels
differ from cuDNN by ~3e-3 (rounding order); fp8 q/k/v by ~5e-2 on Gaussian data."""


class KernelUnavailable(RuntimeError):
    """An explicitly requested kernel cannot run here; the message is one line saying why."""


# ---------------------------------------------------------------------------------------------
# Backends


@torch.library.custom_op("wan_spmd::flash_attention", mutates_args=(), device_types="cuda")
def flash_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
) -> Tensor:
    """FA3's forward, non-causal, softmax scale 1/sqrt(head_dim). bf16 inputs give bf16; e4m3 inputs
    with their (B, H) float32 descales give bf16. (B, S, H, D) in and out."""
    _fa3_ops()
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out, *_ = torch.ops.fa3_fwd.fwd(
        query,
        key,
        value,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        softmax_scale=query.shape[-1] ** -0.5,
        is_causal=False,
        num_splits=1,
    )
    return out


@flash_attention.register_fake
def _flash_attention_fake(query, key, value, q_descale=None, k_descale=None, v_descale=None):
    return query.new_empty((*query.shape[:-1], value.shape[-1]), dtype=_out_dtype(query))


@flash_attention.register_kernel("cpu")
def _flash_attention_reference(query, key, value, q_descale=None, k_descale=None, v_descale=None):
    """The op's contract on the CPU: dequantize, then exact attention in fp32."""
    q, k, v = (dequantize_per_head(t, s) for t, s in ((query, q_descale), (key, k_descale), (value, v_descale)))
    return sdpa(q, k, v).to(_out_dtype(query))


def _out_dtype(query: Tensor) -> torch.dtype:
    return torch.bfloat16 if query.dtype == torch.float8_e4m3fn else query.dtype


def fa3(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """FlashAttention-3, bf16."""
    if query.dtype != torch.bfloat16:  # static under compile: no graph break
        raise TypeError(f"the fa3 backend takes bfloat16 (the fa3-fwd build has no fp16), got {query.dtype}")
    return flash_attention(query, key, value)


def fa3_fp8(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """FlashAttention-3 on e4m3 q, k, v with per-head scales, k smoothed; out in the input dtype."""
    q8, k8, v8, q_scale, k_scale, v_scale = _quantize_qkv(query, key, value)
    return flash_attention(q8, k8, v8, q_scale, k_scale, v_scale).to(query.dtype)


def fa3_fp8_unsmoothed(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """`fa3_fp8` without the smoothing of k (for the measurement that decides whether to smooth)."""
    q8, k8, v8, q_scale, k_scale, v_scale = _quantize_qkv(query, key, value, smooth_k=False)
    return flash_attention(q8, k8, v8, q_scale, k_scale, v_scale).to(query.dtype)


BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa, "fa3": fa3, "fa3-fp8": fa3_fp8}


# ---------------------------------------------------------------------------------------------
# fp8 per-head quantization (fused by inductor; compiled on its own when called eagerly on a GPU)


def quantize_per_head(x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, S, H, D) -> (e4m3 (B, S, H, D), float32 descale (B, H)): each (batch, head) scaled so its
    largest magnitude lands on 448, the e4m3 maximum; x ~= x8 * descale."""
    x = x.float()
    amax = x.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # (B, H)
    descale = amax / E4M3_MAX
    x8 = (x / descale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, descale


def dequantize_per_head(x: Tensor, descale: Tensor | None) -> Tensor:
    """The inverse of `quantize_per_head`, in fp32; a tensor without a descale is only upcast."""
    return x.float() if descale is None else x.float() * descale[:, None, :, None]


def quantize_qkv_fp8(query: Tensor, key: Tensor, value: Tensor, smooth_k: bool = True):
    """(q8, k8, v8, q_descale, k_descale, v_descale) for FA3's fp8 path. Smoothing subtracts k's
    mean over the tokens (per batch, head, channel) before quantizing: every score of one query
    moves by the same q.mean(k), which the softmax cancels."""
    if smooth_k:
        key = key.float()
        key = key - key.mean(dim=1, keepdim=True)  # (B, 1, H, D) mean over tokens
    q8, q_scale = quantize_per_head(query)
    k8, k_scale = quantize_per_head(key)
    v8, v_scale = quantize_per_head(value)
    return q8, k8, v8, q_scale, k_scale, v_scale


@functools.cache
def _compiled_quantizer():
    return torch.compile(quantize_qkv_fp8, fullgraph=True)


def _quantize_qkv(query: Tensor, key: Tensor, value: Tensor, smooth_k: bool = True):
    if torch.compiler.is_compiling() or query.device.type != "cuda":
        return quantize_qkv_fp8(query, key, value, smooth_k)  # inside a compiled block: fused there
    return _compiled_quantizer()(query, key, value, smooth_k)


# ---------------------------------------------------------------------------------------------
# Selection


@functools.cache
def _fa3_ops() -> None:
    """Load FA3's kernels (registers torch.ops.fa3_fwd); ImportError when the package is missing."""
    import fa3_fwd._C  # noqa: F401


def fa3_missing(device: torch.device) -> str | None:
    """What keeps FA3 from running on `device`, in words; None when nothing does."""
    if device.type != "cuda":
        return f"FA3 needs a CUDA GPU and this run is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        name = torch.cuda.get_device_name(device)
        return f"FA3 runs on Hopper (sm90) and {name} is sm{major}{minor}"
    try:
        _fa3_ops()
    except (ImportError, OSError) as e:  # OSError: a wheel built against another torch/CUDA
        return f"the FA3 kernels do not load ({type(e).__name__}: {e}); {HOPPER_EXTRA}"
    return None


def rel_l2(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref||, in fp32."""
    out, ref = out.float(), ref.float()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


@functools.cache
def check_against_sdpa(name: str, device: torch.device) -> float:
    """The backend's worst relL2 against SDPA on two small bf16 cases (self-attention 1024 tokens;
    cross-attention 1024 queries over 512 keys), 4 heads of 128, Gaussian. Run once per process."""
    fn = BACKENDS[name]
    gen = torch.Generator(device=device).manual_seed(0)
    worst = 0.0
    for s_q, s_k in ((1024, 1024), (1024, 512)):
        q, k, v = (
            torch.randn(1, s, 4, 128, generator=gen, device=device, dtype=torch.bfloat16) for s in (s_q, s_k, s_k)
        )
        worst = max(worst, rel_l2(fn(q, k, v), sdpa(q, k, v)))
    return worst


def select_attention(requested: str, device: torch.device) -> tuple[AttentionFn, str]:
    """The attention backend for `--attention`, and a line saying which runs and why.

    `auto`: FA3 bf16 where its kernels load on a Hopper GPU and agree with SDPA on the check case;
    otherwise SDPA, with a warning naming what was missing (an info line off CUDA, where nothing
    is). An explicit `fa3`/`fa3-fp8` that cannot run raises `KernelUnavailable`.
    """
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {requested!r}")
    device = torch.device(device)
    if requested == "sdpa":
        return sdpa, "sdpa (requested)"
    missing = fa3_missing(device)
    name = "fa3" if requested == "auto" else requested
    if missing is None:
        err = check_against_sdpa(name, device)
        if err > CHECK_TOLERANCE[name]:
            missing = f"{name} differs from SDPA by relL2 {err:.1e} on the check case (limit {CHECK_TOLERANCE[name]})"
    if missing is not None:
        if requested != "auto":
            raise KernelUnavailable(f"--attention {requested} cannot run: {missing}")
        (log.warning if device.type == "cuda" else log.info)("attention: sdpa, not FA3: %s", missing)
        return sdpa, f"sdpa (auto: {missing})"
    card = torch.cuda.get_device_name(device)
    how = "auto" if requested == "auto" else "requested"
    return BACKENDS[name], f"{name} ({how}: {card}, relL2 {err:.1e} against SDPA on the check case)"


# ---------------------------------------------------------------------------------------------
# fp8 linears


@dataclass(frozen=True)
class QuantPlan:
    """Which of an expert's linears `quantize_fp8` turns to fp8; everything else stays bf16."""

    modules: tuple[str, ...]
    """Linears inside each block (names under `blocks.<i>.`)."""
    keep_first_blocks: int = 1
    """Leading blocks left in bf16."""
    keep_last_blocks: int = 1
    """Trailing blocks left in bf16."""


FP8_PLAN = QuantPlan(
    modules=(
        # every linear that runs over the video tokens: 99.9% of the block's matmul FLOPs
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_out.0",
        "ffn.net.0.proj",
        "ffn.net.2",
    ),
    keep_first_blocks=1,
    keep_last_blocks=1,
)
"""Left in bf16, and why:
- attn2.to_k / attn2.to_v, the cross-attention's text projections: they see 512 text tokens
  against 32,760-75,600 video tokens, so fp8 would win nothing there and add error to every
  query's keys.
- everything outside `blocks` (patch embedding, timestep and text embedders, proj_out): a tiny
  share of the time, and the timestep/text embedding's error reaches every block's modulation.
- the first and last block: the first reads the raw patch embeddings, the last writes straight
  into the prediction; 2 of 40 blocks is 5% of the fp8 gain. Random weights cannot show their
  sensitivity (all blocks are alike there), so this is the conservative default until measured
  on real weights; `QuantPlan(keep_first_blocks=0, keep_last_blocks=0)` quantizes them too.
"""


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (the TP slice this rank holds); other tensors as they are. Told
    apart by its method: torch.distributed stays in the parallel package (DESIGN.md)."""
    return t.to_local() if hasattr(t, "to_local") else t


def fp8_compatible(linear: nn.Linear) -> bool:
    """torch._scaled_mm wants both weight dims divisible by 16 (torchao silently skips others)."""
    out_features, in_features = _local(linear.weight).shape
    return out_features % 16 == 0 and in_features % 16 == 0


def fp8_linear_names(transformer: nn.Module, plan: QuantPlan = FP8_PLAN) -> tuple[list[str], list[str]]:
    """(names to quantize, names the plan names but whose local slice fp8 cannot take), as full
    module names of `transformer` (`blocks.3.attn1.to_q`). Pure torch: no torchao needed."""
    blocks = transformer.blocks
    chosen, unfit = [], []
    for i in range(plan.keep_first_blocks, len(blocks) - plan.keep_last_blocks):
        for name in plan.modules:
            module = blocks[i].get_submodule(name)
            if not isinstance(module, nn.Linear):
                continue
            (chosen if fp8_compatible(module) else unfit).append(f"blocks.{i}.{name}")
    return chosen, unfit


def tensor_bytes(t: Tensor) -> int:
    """Bytes this rank holds for `t`: a DTensor's local shard, a tensor subclass's inner tensors
    (torchao's Float8Tensor: e4m3 data plus its scales)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers this rank holds for `module`."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True)
class QuantReport:
    quantized: int
    """Linears turned to fp8."""
    unfit: tuple[str, ...]
    """Planned linears left bf16 because their local slice has a dim not divisible by 16."""
    bytes_before: int
    bytes_after: int

    def summary(self) -> str:
        gib = 1 << 30
        line = (
            f"fp8 linears: {self.quantized}; weights {self.bytes_before / gib:.2f} -> "
            f"{self.bytes_after / gib:.2f} GiB on this rank"
        )
        return line + (f" ({len(self.unfit)} left bf16: dims not divisible by 16)" if self.unfit else "")


def fp8_config():
    """torchao's fp8 e4m3 rowwise config: weights quantized once per output row, activations per
    token at run time. `set_inductor_config=False`: torchao would otherwise switch on inductor's
    coordinate-descent tuning (minutes of compile) and lower the process's fp32 matmul precision
    (the fp32 VAE's too)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    except ImportError as e:
        raise KernelUnavailable(f"--quant fp8 needs torchao ({e}); {HOPPER_EXTRA}") from None
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def quantize_fp8(transformer: nn.Module, plan: QuantPlan = FP8_PLAN) -> QuantReport:
    """Turn the planned linears of one expert to fp8 in place, on whatever weight each holds now:
    call it after LoRA fusion and after TP has cut its slices (a DTensor weight is quantized as
    its local shard and wrapped again with the same placements)."""
    config = fp8_config()
    from torchao.quantization import quantize_

    weight = next(transformer.parameters())
    if weight.device.type == "cuda" and torch.cuda.get_device_capability(weight.device) < (8, 9):
        raise KernelUnavailable(f"--quant fp8 needs an fp8 GPU (sm89+), not {torch.cuda.get_device_name()}")
    chosen, unfit = fp8_linear_names(transformer, plan)
    before = weight_bytes(transformer)
    plain = set()
    for name in chosen:
        module = transformer.get_submodule(name)
        if _local(module.weight) is module.weight:
            plain.add(name)
        else:
            _quantize_sharded(module, config)
    quantize_(transformer, config, filter_fn=lambda module, fqn: fqn in plain)
    return QuantReport(len(chosen), tuple(unfit), before, weight_bytes(transformer))


def _quantize_sharded(linear: nn.Linear, config) -> None:
    """Quantize a TP-sharded linear's local slice and wrap it again as a DTensor of the same layout."""
    from torchao.quantization import quantize_

    weight = linear.weight
    holder = nn.Linear(1, 1, bias=False, device="meta")
    holder.weight = nn.Parameter(weight.to_local(), requires_grad=False)
    quantize_(holder, config)
    mesh, placements = weight.device_mesh, weight.placements
    sharded = type(weight).from_local(
        holder.weight, mesh, placements, run_check=False, shape=weight.shape, stride=weight.stride()
    )
    linear.weight = nn.Parameter(sharded, requires_grad=False)
