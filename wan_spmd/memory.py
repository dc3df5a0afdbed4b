"""GPU memory, without torch: what a job's peak was, and where the model's parts should live.

Two things live here because both are arithmetic over numbers:
- `PeakMemory`: a job's peak GPU memory (allocated and reserved by torch's caching allocator),
  the maximum over ranks, as the fronts report it;
- the placement planner: given a model's facts, the parallel layout, the precision, the largest
  request the server admits and a budget per card, the cheapest placement that fits, chosen before
  anything loads (so a budget nothing fits is refused with the numbers, exit 2).

"MB" in the names and fields is MiB (2**20 bytes), as nvidia-smi counts; "GB" in the flag and the
plan is GiB for the same reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from wan_spmd.config import UMT5_XXL_ENCODER, ModelInfo

MIB = 1 << 20
GIB = 1 << 30
NO_BUDGET = 1 << 60
"""The budget of a plan made without a card (the CPU, an offload asked for): anything fits."""


@dataclass(frozen=True)
class PeakMemory:
    """A job's peak GPU memory in MiB, the maximum over ranks (each rank's own peak, reset when the
    job started). `reserved_mb` is what the card must hold (the allocator's segments); `allocated_mb`
    what tensors used of it."""

    allocated_mb: float
    reserved_mb: float

    @property
    def peak_memory_mb(self) -> float:
        """The one number the job record and X-Peak-Memory-MB carry: reserved, what must fit the card."""
        return self.reserved_mb

    def describe(self) -> str:
        return f"peak GPU memory {self.allocated_mb:,.0f} MiB allocated, {self.reserved_mb:,.0f} MiB reserved"

    def fields(self) -> dict[str, float]:
        """For JSON lines: rounded to a tenth of a MiB."""
        return {"peak_memory_mb": round(self.reserved_mb, 1), "peak_allocated_mb": round(self.allocated_mb, 1)}


# ---------------------------------------------------------------------------------------------
# Parameter counts from the architecture (the configs a model folder carries, or config.REAL_MODELS)


def expert_params(config: dict) -> tuple[int, int]:
    """(all parameters, those in the blocks' linear weights) of one `WanTransformer3DModel`.

    The blocks' linear weights are what tensor parallelism splits and what fp8 stores in one byte
    (kernels.py quantizes those); the rest (embedders, norms, biases, the modulation tables, the
    output projection) stays whole and in bf16. For the real I2V-A14B this gives 14.29 B, as
    diffusers counts."""
    dim = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    ffn, layers = int(config["ffn_dim"]), int(config["num_layers"])
    patch = 1
    for p in config.get("patch_size", (1, 2, 2)):
        patch *= int(p)
    in_ch = int(config.get("in_channels", 16))
    out_ch = int(config.get("out_channels", 16))
    text_dim, freq_dim = int(config.get("text_dim", 4096)), int(config.get("freq_dim", 256))
    # per block: self- and cross-attention q, k, v, out (weights and biases) and their q/k RMSNorms
    # across heads; the cross-attention norm (affine); the FFN's two linears; 6 modulation rows
    block_linear = 8 * dim * dim + 2 * dim * ffn
    block_rest = 8 * dim + 4 * dim + (2 * dim if config.get("cross_attn_norm", True) else 0) + ffn + dim + 6 * dim
    embed = (
        in_ch * dim * patch
        + dim  # patch embedding (Conv3d)
        + freq_dim * dim
        + dim
        + dim * dim
        + dim  # time embedder
        + dim * 6 * dim
        + 6 * dim  # time projection
        + text_dim * dim
        + dim
        + dim * dim
        + dim  # text embedder
    )
    head = dim * out_ch * patch + out_ch * patch + 2 * dim  # proj_out and its modulation table
    linear = layers * block_linear
    return linear + layers * block_rest + embed + head, linear


def umt5_encoder_params(config: dict) -> int:
    """Parameters of a `UMT5EncoderModel` (per-layer relative position biases, gated-GELU FFN):
    5.68 B for UMT5-XXL."""
    d_model, d_ff, layers = int(config["d_model"]), int(config["d_ff"]), int(config["num_layers"])
    inner = int(config["num_heads"]) * int(config["d_kv"])
    gated = str(config.get("feed_forward_proj", "gated-gelu")).startswith("gated")
    per_layer = (
        4 * d_model * inner  # q, k, v, o
        + int(config.get("relative_attention_num_buckets", 32)) * int(config["num_heads"])
        + 2 * d_model  # two layer norms
        + (3 if gated else 2) * d_model * d_ff
    )
    return int(config["vocab_size"]) * d_model + layers * per_layer + d_model


VAE_PARAMS = {16: 126_892_531, 48: 704_688_668}
"""Parameters of the VAE by latent channels, counted on diffusers 0.42.1's `AutoencoderKLWan` built
on the meta device: the Wan2.1 VAE (z 16, A14B) and the Wan2.2 VAE (z 48, TI2V-5B)."""


# ---------------------------------------------------------------------------------------------
# The activation model (per rank, bytes), calibrated on the figures measured on H200s
# (docs/benchmarks.md: the TP table; GPU.md-style figures for the VAE)

FORWARD_HIDDEN_COPIES = 6
"""Hidden states (tokens x dim, bf16) alive at a forward's peak: residual, norm output, q, k, v and
the attention output. With 2 FFN intermediates below: I2V-A14B at 75,600 tokens on one GPU grew
8.2 GiB over its loaded weights in a forward (74.4 - 66.2 GiB), and 6 x 0.72 + 2 x 1.95 = 8.2."""
FORWARD_FFN_COPIES = 2
"""FFN intermediates (tokens x ffn_dim, bf16) at the peak: the first linear's output and its GELU."""
FORWARD_FIXED = int(0.7 * GIB)
"""Latents, condition, embeddings, rotary tables and the modulation in fp32; with it TP=2 with
sequence regions comes out at the measured +4.8 GiB per rank (44.9 - 40.1 GiB), and TP=1 at 8.9
(measured 8.2: on the safe side)."""
VAE_DECODE_BYTES_PER_PIXEL_FP32 = 20 * GIB / (1280 * 720)
"""Working memory of the causal VAE decode per output pixel of a frame (it decodes a few latent
frames at a time, so the frame count barely matters): +20 GiB at 1280x720 in fp32, about half in
bf16 (measured: fp32 20.5 GiB, bf16 12.1 GiB at peak with the VAE's own weights). Split by rows
over the ranks when the VAE is parallel. The Wan2.2 VAE (TI2V-5B) is assumed to cost the same per
pixel (not measured)."""
VAE_ENCODE_BYTES_PER_PIXEL_FP32 = VAE_DECODE_BYTES_PER_PIXEL_FP32
"""The I2V condition's encode of the whole video: not measured on its own; taken equal to the
decode (with 64.6 GiB resident a 720p request ran out in the encode on an 80 GB card, so it needs
more than ~14 GiB there)."""
VAE_TILED_FRACTION = 5.3 / 20
"""Spatial tiling (256 px tiles): 5.3 GiB instead of 20 at 720p, 1.75x slower and not exact."""
TEXT_ENCODE_BYTES = int(0.5 * GIB)
"""UMT5-XXL on 512 tokens: a few activations of 512 x 4096; small against the rest."""
CUDA_CONTEXT = int(1.0 * GIB)
"""What the card holds outside torch's allocator (the CUDA context, NCCL buffers): nvidia-smi
counts it, torch's reserved memory does not."""
FRAGMENTATION = 0.10
"""Share of the peak lost to the allocator's fragmentation: cached blocks of one stage's shapes
(the forward's) are not all reusable by the next (the decode's). Calibrated on serve's measured
96,055 MiB (93.8 GiB, nvidia-smi) with everything resident at 1280x720x81 on one H200: the model
gives (84.3 + 1.0) / 0.9 = 94.8 GiB. With it, I2V-A14B at 720p on an 80 GB card does not fit with
only the text encoder offloaded (74.7 / 0.9 = 83 GiB), as measured (it ran out in the decode)."""
PCIE_BYTES_PER_S = 20e9
"""Pinned host-to-device copy rate assumed for the cost of moving weights (PCIe 5 x16 gives
~50 GB/s peak; 20 is a conservative figure until measured)."""


@dataclass(frozen=True)
class ModelBytes:
    """One rank's weights in bytes, by component, as a layout and precision place them."""

    expert: int
    """One expert's slice on this rank."""
    experts: int
    """How many experts the family has."""
    text_encoder: int
    vae: int
    expert_block: int
    """One transformer block of one expert on this rank (the unit of block streaming)."""

    @property
    def total(self) -> int:
        return self.expert * self.experts + self.text_encoder + self.vae


def model_bytes(
    transformer_config: dict,
    text_encoder_config: dict,
    vae_z_dim: int,
    experts: int,
    tp: int = 1,
    quant: str = "none",
    vae_dtype: str = "fp32",
) -> ModelBytes:
    """Per-rank weight bytes: bf16 experts (their blocks' linears split over `tp`; one byte each
    under fp8), a bf16 text encoder and the VAE in `vae_dtype`, both whole on every rank."""
    total, linear = expert_params(transformer_config)
    linear_bytes = 1 if quant == "fp8" else 2
    expert = (linear // tp) * linear_bytes + (total - linear) * 2
    layers = int(transformer_config["num_layers"])
    return ModelBytes(
        expert=expert,
        experts=experts,
        text_encoder=umt5_encoder_params(text_encoder_config) * 2,
        vae=VAE_PARAMS.get(vae_z_dim, VAE_PARAMS[48]) * (4 if vae_dtype == "fp32" else 2),
        expert_block=(linear // layers // tp) * linear_bytes,
    )


@dataclass(frozen=True)
class Request:
    """The largest request the plan must hold: its frame and its transformer tokens."""

    width: int
    height: int
    num_frames: int
    tokens: int
    image_condition: bool
    """The I2V condition's VAE encode of the whole video runs (channel-concat families)."""


@dataclass(frozen=True)
class Activations:
    """Working memory per stage on one rank, bytes."""

    text_encode: int
    vae_encode: int
    denoise: int
    decode: int


def activations(
    request: Request,
    transformer_config: dict,
    tp: int = 1,
    ulysses: int = 1,
    world_size: int = 1,
    vae_dtype: str = "fp32",
    parallel_vae: bool = True,
    vae_tiled: bool = False,
    step_cache: bool = False,
) -> Activations:
    """The activation model: a forward's peak is `FORWARD_HIDDEN_COPIES` hidden states plus
    `FORWARD_FFN_COPIES` FFN intermediates of the rank's share of the tokens (tp splits the heads
    and the FFN and, through the sequence regions, the hidden state between blocks; ulysses splits
    the tokens), plus `FORWARD_FIXED`; the VAE's working memory scales with the frame's pixels,
    split over the ranks when the VAE is parallel."""
    dim = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
    ffn = int(transformer_config["ffn_dim"])
    share = tp * ulysses
    hidden = request.tokens * dim * 2
    intermediate = request.tokens * ffn * 2
    denoise = (FORWARD_HIDDEN_COPIES * hidden + FORWARD_FFN_COPIES * intermediate) // share + FORWARD_FIXED
    if step_cache:  # one residual of the rank's tokens per guidance branch it runs (step_cache.residual_bytes)
        branches = 1 if world_size > share else 2  # CFG-parallel: one branch per rank
        denoise += -(-request.tokens // share) * dim * 2 * branches
    pixels = request.width * request.height / (world_size if parallel_vae else 1)
    scale = (1.0 if vae_dtype == "fp32" else 0.5) * (VAE_TILED_FRACTION if vae_tiled else 1.0)
    decode = int(VAE_DECODE_BYTES_PER_PIXEL_FP32 * pixels * scale)
    encode = int(VAE_ENCODE_BYTES_PER_PIXEL_FP32 * pixels * scale) if request.image_condition else 0
    return Activations(TEXT_ENCODE_BYTES, encode, denoise, decode)


# ---------------------------------------------------------------------------------------------
# Placements and the planner

PLACEMENTS = ("resident", "text_encoder", "experts", "vae_tiled", "block_streaming")
"""Cheapest first; each keeps the steps before it:
- resident: every weight on the card all the time;
- text_encoder: the text encoder waits in pinned host memory and comes back for each request's
  prompt encoding (its host copy is permanent, so moving it off costs nothing);
- experts: each expert is on the card only for its own denoising phase, copied in from pinned host
  memory on a side stream during the stage before it (the high-noise one once the prompt is
  encoded, during the VAE encode; the low-noise one during the high-noise steps), so at the switch both are held;
- vae_tiled: the VAE encodes and decodes in spatial tiles (1.75x slower, not exact);
- block_streaming: the running expert's blocks stream in one at a time (last resort, slow)."""
BUILT = ("resident", "text_encoder", "experts")
"""The placements this version carries out; the planner still prices the others, so a budget that
would need them is refused with the numbers instead of loading and running out."""


@dataclass(frozen=True)
class Plan:
    """A placement for one rank and what it costs."""

    placement: str
    budget: int
    """Bytes the card may use (the flag, or the card's memory)."""
    peak: int
    """Expected peak as nvidia-smi shows it, bytes: (weights on the card at the worst stage + its
    working memory + the CUDA context) / (1 - FRAGMENTATION). It must be within the budget."""
    peak_stage: str
    stages: dict[str, int]
    """Expected card bytes per stage (text_encode, vae_encode, denoise, decode)."""
    on_card: dict[str, str]
    """Component -> where it lives ("card", "host, on the card for ...")."""
    host_bytes: int
    """Pinned host memory this rank needs for its offloaded copies."""
    moved_per_request: int
    """Bytes copied host -> card per request (the cost; hidden behind compute where overlapped)."""
    weights: ModelBytes
    request: Request
    fits: bool

    def describe(self, ranks_per_host: int = 1) -> str:
        """The plan as logged at ready: what lives where, the expected peak, the host RAM needed."""
        where = ", ".join(f"{name} {place}" for name, place in self.on_card.items())
        stages = ", ".join(f"{name} {size / GIB:.1f}" for name, size in self.stages.items())
        host = self.host_bytes * ranks_per_host
        moved_gib, moved_s = self.moved_per_request / GIB, self.moved_per_request / PCIE_BYTES_PER_S
        moved = (
            f"; moves {moved_gib:.1f} GiB per request ({moved_s:.2f} s at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s)"
            if self.moved_per_request
            else ""
        )
        r = self.request
        budget = "" if self.budget >= NO_BUDGET else f" of {self.budget / GIB:.1f}"
        return (
            f"memory plan '{self.placement}' for {r.width}x{r.height}x{r.num_frames} ({r.tokens} tokens): "
            f"expected peak {self.peak / GIB:.1f} GiB per card{budget} "
            f"(at {self.peak_stage}; GiB by stage: {stages}); {where}; host RAM for offloaded weights "
            f"{host / GIB:.1f} GiB per host{moved}"
        )


class BudgetTooSmall(ValueError):
    """No placement fits the budget (one line with the numbers; the CLI exits 2 before loading)."""


def _stages(weights: ModelBytes, acts: Activations, placement: str) -> tuple[dict[str, int], dict[str, str], int, int]:
    """Card bytes per stage, where each component lives, host bytes, bytes moved per request."""
    level = PLACEMENTS.index(placement)
    te_off, experts_off, streaming = level >= 1, level >= 2, level >= 4
    expert, te, vae = weights.expert, weights.text_encoder, weights.vae
    two = weights.experts == 2
    if streaming:  # two blocks of the running expert: the one computing and the one arriving
        running, both = 2 * weights.expert_block, 2 * weights.expert_block
    else:
        running = expert
        both = expert * weights.experts  # resident, or at the switch under expert offload
    # experts held in each stage: all of them unless offloaded; offloaded, only the one running or
    # arriving (the high-noise expert arrives after the prompt is encoded, during the VAE encode)
    held = {
        "text_encode": 0 if experts_off else both,
        "vae_encode": running if experts_off else both,
        "denoise": both,
        "decode": 0 if experts_off else both,
    }
    if streaming:
        held = {stage: running if stage != "decode" else 0 for stage in held}
    stages = {
        "text_encode": held["text_encode"] + te + vae + acts.text_encode,
        "vae_encode": held["vae_encode"] + (0 if te_off else te) + vae + acts.vae_encode,
        "denoise": held["denoise"] + (0 if te_off else te) + vae + acts.denoise,
        "decode": held["decode"] + (0 if te_off else te) + vae + acts.decode,
    }
    on_card = {
        "transformer": "streamed by block from host"
        if streaming
        else "host, on the card while it runs"
        if experts_off
        else "card",
    }
    if two:
        on_card["transformer_2"] = on_card["transformer"]
    on_card["text_encoder"] = "host, on the card to encode" if te_off else "card"
    on_card["vae"] = "card, tiled" if level >= 3 else "card"
    host = (te if te_off else 0) + (expert * weights.experts if experts_off else 0)
    moved = (te if te_off else 0) + (expert * weights.experts if experts_off else 0)
    return stages, on_card, host, moved


def plan(
    weights: ModelBytes,
    request: Request,
    transformer_config: dict,
    budget: int,
    tp: int = 1,
    ulysses: int = 1,
    world_size: int = 1,
    vae_dtype: str = "fp32",
    parallel_vae: bool = True,
    placement: str = "auto",
    built: tuple[str, ...] = BUILT,
    step_cache: bool = False,
) -> Plan:
    """The cheapest placement whose expected peak fits `budget` (or the one asked for, priced);
    raises BudgetTooSmall naming the numbers when none does, or when only one this version does not
    carry out would (those not in `built`)."""
    if placement != "auto" and placement not in PLACEMENTS:
        raise ValueError(f"placement must be auto or one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if placement != "auto" and placement not in built:
        raise ValueError(f"placement {placement!r} is not carried out here (it is done for {', '.join(built)})")
    candidates = PLACEMENTS if placement == "auto" else (placement,)
    tried: list[Plan] = []
    for name in candidates:
        tiled = PLACEMENTS.index(name) >= PLACEMENTS.index("vae_tiled")
        acts = activations(
            request, transformer_config, tp, ulysses, world_size, vae_dtype, parallel_vae, tiled, step_cache
        )
        stages, on_card, host, moved = _stages(weights, acts, name)
        stage = max(stages, key=lambda s: stages[s])
        peak = int((stages[stage] + CUDA_CONTEXT) / (1 - FRAGMENTATION))
        fits = peak <= budget
        tried.append(Plan(name, budget, peak, stage, stages, on_card, host, moved, weights, request, fits))
        if fits and name in built:
            return tried[-1]
        if fits:
            break
    best = tried[-1] if tried[-1].fits else min(tried, key=lambda p: p.peak)
    doable = [p for p in tried if p.placement in built]
    if best.fits and doable:
        why = " with --tp or --quant fp8" if best.placement in BUILT else ""
        needs = (
            f"only '{best.placement}' fits (expected peak {best.peak / GIB:.1f} GiB), which this version does not "
            f"do{why} yet; '{doable[-1].placement}' needs {doable[-1].peak / GIB:.1f} GiB (at {doable[-1].peak_stage})"
        )
    else:
        needs = f"the smallest placement, '{best.placement}', needs {best.peak / GIB:.1f} GiB (at {best.peak_stage})"
    raise BudgetTooSmall(
        f"--gpu-memory {budget / GIB:.1f} GiB per card is too small for {request.width}x{request.height}x"
        f"{request.num_frames} ({request.tokens} tokens): {needs}; weights per rank {weights.total / GIB:.1f} GiB. "
        "Lower --max-width/--max-height/--max-frames, use --vae-dtype bf16 or more ranks (--tp), "
        "or give a larger --gpu-memory"
    )


# ---------------------------------------------------------------------------------------------
# From a model's facts and the flags to a plan


def safetensors_params(folder: Path) -> int | None:
    """Elements stored in a component folder's safetensors files, read from their JSON headers
    (no tensor is read); None if it has none."""
    total, found = 0, False
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for n in entry["shape"]:
                count *= int(n)
            total += count
            found = True
    return total if found else None


def weights_for(info: ModelInfo, tp: int = 1, quant: str = "none", vae_dtype: str = "fp32") -> ModelBytes:
    """Per-rank weight bytes of a model: a folder's components counted from its safetensors headers
    (exact), a named architecture (`--load-format dummy`) from its configuration."""
    te_config = UMT5_XXL_ENCODER
    counted: dict[str, int | None] = {}
    if info.path is not None:
        te_file = info.path / "text_encoder" / "config.json"
        if te_file.is_file():
            te_config = json.loads(te_file.read_text())
        counted = {name: safetensors_params(info.path / name) for name in ("transformer", "text_encoder", "vae")}
    shaped = model_bytes(
        info.transformer_config, te_config, info.family.vae_z_dim, info.family.experts, tp, quant, vae_dtype
    )
    _, linear = expert_params(info.transformer_config)
    if counted.get("transformer"):  # the folder's own count; the linear share from the architecture
        rest = max(int(counted["transformer"]) - linear, 0)
        shaped = replace(shaped, expert=(linear // tp) * (1 if quant == "fp8" else 2) + rest * 2)
    if counted.get("text_encoder"):
        shaped = replace(shaped, text_encoder=int(counted["text_encoder"]) * 2)
    if counted.get("vae"):
        shaped = replace(shaped, vae=int(counted["vae"]) * (4 if vae_dtype == "fp32" else 2))
    return shaped


def parse_gpu_memory(text: str, card_bytes: int | None) -> int:
    """`--gpu-memory`: GiB per card (`48`), or a fraction of the card's memory (`0.9`, as vLLM's
    --gpu-memory-utilization); `auto`: the card's memory. One line naming the value when it is bad."""
    value = text.strip().lower()
    if value == "auto":
        if card_bytes is None:
            raise ValueError("--gpu-memory auto needs a GPU to read its memory from; give GiB (e.g. 80) on the CPU")
        return card_bytes
    try:
        number = float(value)
    except ValueError:
        raise ValueError(
            f"--gpu-memory must be GiB per card (e.g. 80), a fraction (e.g. 0.9) or auto, got {text!r}"
        ) from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"--gpu-memory must be a positive number, got {text!r}")
    if number <= 1:
        if card_bytes is None:
            raise ValueError(
                f"--gpu-memory {text} is a fraction of the card's memory, and there is no GPU here; give GiB"
            )
        return int(card_bytes * number)
    return int(number * GIB)


OFFLOAD_CHOICES = {"auto": "auto", "none": "resident", "text-encoder": "text_encoder", "experts": "experts"}
"""`--offload`: the planner's choice, or a placement forced (priced all the same)."""


def plan_for(
    info: ModelInfo,
    request: Request,
    budget: int,
    tp: int = 1,
    ulysses: int = 1,
    world_size: int = 1,
    quant: str = "none",
    vae_dtype: str = "fp32",
    parallel_vae: bool = True,
    offload: str = "auto",
    step_cache: bool = False,
) -> Plan:
    """The plan for one rank of this model, layout and request within `budget` bytes per card
    (`step_cache`: --cache-backend holds residuals while denoising)."""
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"--offload must be one of {', '.join(OFFLOAD_CHOICES)}, got {offload!r}")
    weights = weights_for(info, tp, quant, vae_dtype)
    # the Wan2.2 VAE (48 latent channels) still decodes on rank 0 alone
    split_vae = parallel_vae and info.family.vae_z_dim == 16
    return plan(
        weights,
        request,
        info.transformer_config,
        budget,
        tp,
        ulysses,
        world_size,
        vae_dtype,
        split_vae,
        placement=OFFLOAD_CHOICES[offload],
        # a tensor-parallel expert's slices are DTensors, and fp8 weights torchao's tensor
        # subclasses, which the offload does not move (yet)
        built=BUILT if tp == 1 and quant == "none" else tuple(p for p in BUILT if p != "experts"),
        step_cache=step_cache,
    )
