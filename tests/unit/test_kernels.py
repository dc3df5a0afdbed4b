"""The kernel module on the CPU: backend selection and its fallback, the FA3 custom op's contract
(fake tensors, compile without graph breaks, its CPU reference), the fp8 per-head quantization
math and the fp8 linear plan. The kernels themselves run on Hopper only (benchmarks/kernels_bench.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from wan_spmd import kernels as K
from wan_spmd.tiny import tiny_transformer_config

CPU = torch.device("cpu")


def randn(*shape: int, seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def qkv(s_q: int = 64, s_k: int = 64, heads: int = 3, head_dim: int = 32, seed: int = 0):
    return randn(2, s_q, heads, head_dim, seed=seed), *(randn(2, s_k, heads, head_dim, seed=seed + i) for i in (1, 2))


# ---------------------------------------------------------------------------------------------
# Selection


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_auto_on_cpu_is_sdpa_with_the_reason():
    """`--attention auto` must run anywhere: on a CPU it falls back to SDPA and says why."""
    logger, seen = logging.getLogger("wan_spmd"), Records()  # our logger may not propagate to caplog's
    logger.addHandler(seen)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        fn, reason = K.select_attention("auto", CPU)
    finally:
        logger.removeHandler(seen)
        logger.setLevel(level)
    assert fn is K.sdpa
    assert reason.startswith("sdpa (auto: ") and "CUDA" in reason
    assert any("not FA3" in r.getMessage() for r in seen.records)


def test_sdpa_backend_is_torch_sdpa_in_bshd_layout():
    """The backend signature is (B, S, H, D): a layout slip would transpose heads and tokens."""
    fn, reason = K.select_attention("sdpa", CPU)
    q, k, v = qkv(s_k=40)
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert reason == "sdpa (requested)"
    assert torch.equal(fn(q, k, v), want)
    assert fn(q, k, v).shape == q.shape


@pytest.mark.parametrize("name", ["fa3", "fa3-fp8"])
def test_explicit_fa3_off_hopper_is_one_clear_line(name):
    """An explicit kernel that cannot run must refuse at start-up, in one line naming the cause,
    never silently run SDPA instead."""
    with pytest.raises(K.KernelUnavailable) as err:
        K.select_attention(name, CPU)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"--attention {name} cannot run: ") and "CUDA" in message


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="auto, sdpa, fa3, fa3-fp8.*'fa4'"):
        K.select_attention("fa4", CPU)


# ---------------------------------------------------------------------------------------------
# The custom op


def test_op_fake_tensor_shapes_and_dtypes():
    """The fake implementation is what torch.compile traces: its shape or dtype must match the
    kernel's (fp8 in -> bf16 out; cross-attention keeps the query length), or a compiled block
    would be built around a wrong tensor."""
    with FakeTensorMode():
        q, k, v = (torch.empty(2, s, 5, 128, dtype=torch.bfloat16) for s in (1000, 512, 512))
        out = K.flash_attention(q, k, v)
        assert (out.shape, out.dtype) == ((2, 1000, 5, 128), torch.bfloat16)
        q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
        scales = [torch.empty(2, 5) for _ in range(3)]
        out8 = K.flash_attention(q8, k8, v8, *scales)
        assert (out8.shape, out8.dtype) == ((2, 1000, 5, 128), torch.bfloat16)


def test_opcheck_bf16_and_fp8():
    """torch's own checks of a custom op: schema, fake tensor against the real (CPU reference)
    kernel, and AOT dispatch, for the bf16 and the fp8 call."""
    q, k, v = qkv(s_q=48, s_k=32, heads=2, head_dim=16)
    torch.library.opcheck(K.flash_attention, (q, k, v))
    # the schema check compares inputs before and after with arithmetic e4m3 lacks on the CPU
    fp8_checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(K.flash_attention, K.quantize_qkv_fp8(q, k, v), test_utils=fp8_checks)


@pytest.mark.parametrize("fn", [K.fa3, K.fa3_fp8], ids=["fa3", "fa3-fp8"])
def test_backends_compile_fullgraph(fn):
    """A graph break at the attention call would split every compiled block in two (and
    fullgraph=True, which compile_blocks uses, turns it into an error)."""
    q, k, v = qkv()

    def block_like(q, k, v):
        return fn(q * 1.0, k, v).flatten(2) * 2.0

    compiled = torch.compile(block_like, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), block_like(q, k, v))


def test_fa3_takes_bf16_only():
    """The fa3-fwd wheel has no fp16 kernels: a wrong dtype must be a clear error, not a crash."""
    with pytest.raises(TypeError, match="bfloat16"):
        K.fa3(*(t.float() for t in qkv()))


# ---------------------------------------------------------------------------------------------
# fp8 per-head quantization


def test_per_head_scales_map_each_heads_max_to_448():
    """One scale per (batch, head): a head 1000x louder than the rest must not flatten the others
    into e4m3's subnormals."""
    x = randn(2, 50, 4, 16, dtype=torch.float32)
    x[:, :, 2] *= 1000.0
    x8, descale = K.quantize_per_head(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (2, 4) and descale.dtype == torch.float32
    assert torch.allclose(x8.float().abs().amax(dim=(1, 3)), torch.full((2, 4), K.E4M3_MAX))
    back = K.dequantize_per_head(x8, descale)
    for head in range(4):  # e4m3 keeps 3 mantissa bits: ~2-3% relative error per head
        assert K.rel_l2(back[:, :, head], x[:, :, head]) < 0.04


def test_smoothing_k_leaves_attention_unchanged_and_helps_fp8():
    """Subtracting k's mean over tokens changes every score of a query by the same amount (exact
    attention unchanged); with a large per-channel offset in k, it is what keeps fp8 accurate."""
    q, k, v = (t.float() for t in qkv(s_q=128, s_k=128, head_dim=64, seed=3))
    k = k + 4.0 * randn(1, 1, 3, 64, seed=9, dtype=torch.float32)  # a shared per-channel offset
    exact = K.sdpa(q, k, v)
    assert K.rel_l2(K.sdpa(q, k - k.mean(dim=1, keepdim=True), v), exact) < 1e-5
    q, k, v = (t.bfloat16() for t in (q, k, v))
    smoothed, plain = K.rel_l2(K.fa3_fp8(q, k, v), exact), K.rel_l2(K.fa3_fp8_unsmoothed(q, k, v), exact)
    assert smoothed < 0.07 and smoothed < 0.7 * plain


def test_fa3_fp8_reference_error_on_gaussian_data():
    """fp8 q/k/v with per-head scales stays near the 5e-2 seen on the GPU; bf16 near exact."""
    q, k, v = qkv(s_q=256, s_k=128, head_dim=64)
    exact = K.sdpa(q.float(), k.float(), v.float())
    assert K.rel_l2(K.fa3(q, k, v), exact) < 1e-2
    assert K.rel_l2(K.fa3_fp8(q, k, v), exact) < 0.07
    assert K.fa3_fp8(q, k, v).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# The fp8 linear plan


def tiny_expert(num_layers: int = 4, head_dim: int = 16, ffn_dim: int = 128) -> nn.Module:
    config = tiny_transformer_config(in_channels=36) | dict(
        num_layers=num_layers, attention_head_dim=head_dim, ffn_dim=ffn_dim
    )
    return WanTransformer3DModel(**config).eval()


def test_plan_takes_the_token_linears_of_the_middle_blocks():
    """What --quant fp8 touches: the planned linears of blocks 1..n-2, never the cross-attention's
    text projections, the embedders or proj_out."""
    chosen, unfit = K.fp8_linear_names(tiny_expert())
    assert unfit == []
    assert chosen == [f"blocks.{i}.{name}" for i in (1, 2) for name in K.FP8_PLAN.modules]
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v")) for n in chosen)
    everything = K.QuantPlan(modules=K.FP8_PLAN.modules, keep_first_blocks=0, keep_last_blocks=0)
    assert len(K.fp8_linear_names(tiny_expert(), everything)[0]) == 4 * len(K.FP8_PLAN.modules)


def slice_like_tp(expert: nn.Module, tp_size: int) -> None:
    """What TP leaves on one rank: column-parallel linears with out_features/tp rows, row-parallel
    ones with in_features/tp columns (the plain tensors of a rank's shard)."""
    from wan_spmd.parallel.tp import TP_PLAN

    for block in expert.blocks:
        for name, style in TP_PLAN.items():
            if style not in ("colwise", "rowwise"):
                continue
            old = block.get_submodule(name)
            out_f, in_f = old.out_features, old.in_features
            out_f, in_f = (out_f // tp_size, in_f) if style == "colwise" else (out_f, in_f // tp_size)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, nn.Linear(in_f, out_f))


def test_plan_after_a_tp_slice_checks_the_local_shapes():
    """fp8 matmuls need both local dims divisible by 16: after a TP slice the plan must judge the
    shard a rank holds, and report (not silently skip) the linears it cannot take."""
    expert = tiny_expert(head_dim=16, ffn_dim=128)  # 4 heads x 16 = 64 wide
    slice_like_tp(expert, tp_size=2)  # 64 -> 32 and 128 -> 64: still divisible by 16
    chosen, unfit = K.fp8_linear_names(expert)
    assert len(chosen) == 2 * len(K.FP8_PLAN.modules) and unfit == []
    slice_like_tp(expert, tp_size=4)  # 32 -> 8: too narrow
    chosen, unfit = K.fp8_linear_names(expert)
    assert "blocks.1.attn1.to_q" in unfit and "blocks.1.attn1.to_q" not in chosen


def test_weight_bytes_counts_what_this_rank_holds():
    """The ready line's before/after: bf16 weights at 2 bytes each, e4m3 at 1."""
    linear = nn.Linear(32, 16, bias=False, dtype=torch.bfloat16)
    assert K.weight_bytes(linear) == 32 * 16 * 2
    linear.weight = nn.Parameter(linear.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    assert K.weight_bytes(linear) == 32 * 16


def test_quantize_fp8_without_torchao_is_one_clear_line():
    """The CPU install has no torchao: --quant fp8 must say how to get it, in one line."""
    try:
        import torchao  # noqa: F401

        pytest.skip("torchao is installed here")
    except ImportError:
        pass
    with pytest.raises(K.KernelUnavailable) as err:
        K.quantize_fp8(tiny_expert())
    assert "\n" not in str(err.value) and "wan_spmd[hopper]" in str(err.value)
