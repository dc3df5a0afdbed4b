"""Step caching: skip an expert's transformer blocks on denoising steps that would change little.

On a skipped step the blocks are not run; their input gets the residual (output - input) that the
last computed step of the same expert and guidance branch left, and the output norm and projection
run as usual. Two published policies decide which steps to skip, both once per *step* (covering both
guidance branches), from values that do not depend on any rank's share of the tokens:

- TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
  CVPR 2025; github.com/ali-vilab/TeaCache, TeaCache4Wan2.1): the relative L1 change of the
  modulated timestep embedding (`time_proj(act(time_embedder(t)))`, the "e0" input), rescaled by a
  polynomial fitted per model, accumulated until it crosses `rel_l1_thresh`.
- MagCache (Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache", NeurIPS 2025,
  arXiv:2506.09045; github.com/Zehong-Ma/MagCache): a calibrated curve of residual magnitude ratios
  per step; the accumulated error |1 - prod(ratios)| must stay under `magcache_thresh`, with at most
  `magcache_K` skips in a row and the first `retention_ratio` of the steps always computed.

One decision on every rank: a skip decided differently on two ranks would leave one rank in the
blocks' collectives alone. The inputs here are replicated (the timestep embedding runs on weights
every rank holds whole; MagCache's curve is a table), and on top of that the decision is agreed
across the replica before the step (`agree`: the runtime's control plane; compute if any rank
wants to), so a rank whose inputs differed would still follow the others. The switch between the
two experts (boundary_ratio) resets the cache: the first step of each expert always computes.

Where the blocks are skipped: an expert's forward (`parallel.ParallelExpert`, or diffusers'
`WanTransformer3DModel.forward` for a whole expert) runs `for block in self.blocks` between the
patch embedding (and the layout's token split) and the gather and output norm; `CachedBlocks` (the
same block modules, in a ModuleList) yields, for a forward inside a step, either the blocks
between two marks that record their input and output, or one stand-in that adds the cached
residual. Each rank thus keeps the residual of its own token shard, and the gather after the blocks
runs on every rank either way. The compiled blocks are the same objects on computed steps and are
not called on skipped ones: nothing recompiles. Memory per rank: one residual (B, S / (ulysses x
tp), D) in the transformer's dtype per guidance branch it runs (two with serial CFG), e.g. 2 x 335
MB on one GPU at 832x480x81 for A14B, held only while a job runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from wan_spmd.launch import CacheSpec

log = logging.getLogger("wan_spmd")

# TeaCache4Wan2.1 (teacache_generate.py, use_ret_steps=True: the "e0" modulated input), published
# polynomial coefficients, highest power first (numpy.poly1d order). No Wan2.2 fit was published;
# the Wan2.1 14B fits are what TeaCache users run on Wan2.2's 14B experts and 5B model.
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "t2v-14b": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    "i2v-480p": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "i2v-720p": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}
TEACACHE_RET_STEPS = 5
"""use_ret_steps: the first 5 steps always compute (TeaCache4Wan2.1's ret_steps = 5 x 2 calls)."""
TEACACHE_THRESHOLD = 0.2
"""rel_l1_thresh: vllm-omni's documented example value; TeaCache4Wan2.1 lists 0.1-0.3 for 14B."""

# MagCache's published magnitude ratios (T2V calibrated on 50 steps, I2V on 40), cond and uncond interleaved as
# published (ComfyUI-MagCache's SUPPORTED_MODELS_MAG_RATIOS, from MagCache4Wan2.1). MagCache4Wan2.2
# calibrates its own curves; where those are wanted pass them as --cache-config mag_ratios.
MAGCACHE_RATIOS: dict[str, tuple[float, ...]] = {
    "t2v-14b": (
        1.0, 1.0, 1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966, 0.99658,
        0.99482, 0.99476, 0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533, 0.99545, 0.99468,
        0.99465, 0.99438, 0.99434, 0.99516, 0.99517, 0.99384, 0.9938, 0.99404, 0.99401, 0.99517, 0.99516,
        0.99409, 0.99408, 0.99428, 0.99426, 0.99347, 0.99343, 0.99418, 0.99416, 0.99271, 0.99269, 0.99313,
        0.99311, 0.99215, 0.99215, 0.99218, 0.99215, 0.99216, 0.99217, 0.99163, 0.99161, 0.99138, 0.99135,
        0.98982, 0.9898, 0.98996, 0.98995, 0.9887, 0.98866, 0.98772, 0.9877, 0.98767, 0.98765, 0.98573,
        0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177, 0.98173, 0.98037, 0.98035, 0.97678, 0.97677,
        0.97546, 0.97543, 0.97184, 0.97183, 0.96711, 0.96708, 0.96349, 0.96345, 0.95629, 0.95625, 0.94926,
        0.94929, 0.93964, 0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796, 0.87945, 0.86111, 0.86189,
    ),
    "i2v-480p": (
        1.0, 1.0, 0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878,
        0.98762, 0.98759, 0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886, 0.99065,
        0.99068, 0.98845, 0.98847, 0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861, 0.98823, 0.98823,
        0.98756, 0.98759, 0.98808, 0.98814, 0.98721, 0.98724, 0.98571, 0.98572, 0.98543, 0.98544, 0.98157,
        0.98165, 0.98411, 0.98413, 0.97952, 0.97953, 0.98149, 0.9815, 0.9774, 0.97742, 0.97825, 0.97826,
        0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055, 0.96588, 0.96587, 0.96113, 0.96124, 0.9567,
        0.95681, 0.94961, 0.94969, 0.93973, 0.93988, 0.93217, 0.93224, 0.91878, 0.91896, 0.90955, 0.90954,
        0.92617, 0.92616,
    ),
    "i2v-720p": (
        1.0, 1.0, 0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911, 0.98917,
        0.98646, 0.98652, 0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102, 0.99103, 0.99215,
        0.99212, 0.99515, 0.99515, 0.99576, 0.99572, 0.99068, 0.99072, 0.99097, 0.99097, 0.99166, 0.99169,
        0.99041, 0.99042, 0.99201, 0.99198, 0.99101, 0.99101, 0.98599, 0.98603, 0.98845, 0.98844, 0.98848,
        0.98851, 0.98862, 0.98857, 0.98718, 0.98719, 0.98497, 0.98497, 0.98264, 0.98263, 0.98389, 0.98393,
        0.97938, 0.9794, 0.97535, 0.97536, 0.97498, 0.97499, 0.973, 0.97301, 0.96827, 0.96828, 0.96261,
        0.96263, 0.95335, 0.9534, 0.94649, 0.94655, 0.93397, 0.93414, 0.91636, 0.9165, 0.89088, 0.89109,
        0.8679, 0.86768,
    ),
}  # fmt: skip
MAGCACHE_THRESHOLD = 0.06
"""magcache_thresh of MagCache4Wan2.2's published settings (E006K2R01 I2V, E006K2R04 T2V, E006K2R02 TI2V)."""
MAGCACHE_K = 2
MAGCACHE_RETENTION = {"wan2.2-i2v-a14b": 0.1, "wan2.2-t2v-a14b": 0.4, "wan2.2-ti2v-5b": 0.2}


def published_table(family: str, width: int, height: int) -> str:
    """Which published fit a request uses: I2V by resolution (480p up to 480 x 832 pixels), else T2V 14B."""
    if family == "wan2.2-i2v-a14b":
        return "i2v-480p" if width * height <= 480 * 832 else "i2v-720p"
    return "t2v-14b"


def nearest_interp(curve: tuple[float, ...], length: int) -> list[float]:
    """A calibrated per-step curve resampled to `length` steps by nearest index (MagCache's way)."""
    if length == 1:
        return [curve[-1]]
    scale = (len(curve) - 1) / (length - 1)
    return [curve[round(i * scale)] for i in range(length)]


class TeaCache:
    """TeaCache's rule on the modulated timestep embedding, one decision per step."""

    def __init__(self, threshold: float, coefficients: tuple[float, ...], ret_steps: int) -> None:
        self.threshold = threshold
        self.coefficients = coefficients
        self.ret_steps = ret_steps
        self.reset()

    def reset(self) -> None:
        self.accumulated = 0.0
        self.previous: torch.Tensor | None = None

    def rescale(self, x: float) -> float:
        out = 0.0
        for c in self.coefficients:  # Horner, highest power first
            out = out * x + c
        return out

    def wants_compute(self, step: int, total: int, modulated: torch.Tensor) -> bool:
        previous, self.previous = self.previous, modulated
        if previous is None or step < self.ret_steps:
            self.accumulated = 0.0
            return True
        relative = ((modulated - previous).abs().mean() / previous.abs().mean()).item()
        self.accumulated += self.rescale(relative)
        if self.accumulated < self.threshold:
            return False
        self.accumulated = 0.0
        return True

    def computed(self) -> None:
        """The step computed after all (another rank, or no residual yet): accumulate from here."""
        self.accumulated = 0.0


class MagCache:
    """MagCache's rule on a calibrated magnitude-ratio curve; both branches must allow the skip."""

    def __init__(self, threshold: float, max_skips: int, retention: float, ratios: tuple[float, ...]) -> None:
        self.threshold = threshold
        self.max_skips = max_skips
        self.retention = retention
        # published curves interleave (cond, uncond) per step; a single curve serves both branches
        self.curves = (ratios[0::2], ratios[1::2]) if len(ratios) % 2 == 0 and len(ratios) > 2 else (ratios, ratios)
        self.reset()

    def reset(self) -> None:
        self.ratio = [1.0, 1.0]
        self.error = [0.0, 0.0]
        self.skipped = 0

    def wants_compute(self, step: int, total: int, modulated: torch.Tensor | None = None) -> bool:
        if step < int(self.retention * total):
            self.reset()
            return True
        for branch, curve in enumerate(self.curves):
            self.ratio[branch] *= nearest_interp(curve, total)[step]
            self.error[branch] += abs(1.0 - self.ratio[branch])
        self.skipped += 1
        if max(self.error) < self.threshold and self.skipped <= self.max_skips:
            return False
        self.reset()
        return True

    def computed(self) -> None:
        """The step computed after all: the error counts from this step again."""
        self.reset()


Agree = Callable[[int, bool], bool]
"""(step, this rank wants to compute) -> whether every rank computes (True if any rank wants to)."""


def _alone(step: int, wants: bool) -> bool:
    return wants


@dataclass
class JobCacheStats:
    """What one job's cache did, per expert: transformer forwards skipped of those run or skipped."""

    skipped: dict[str, int] = field(default_factory=dict)
    forwards: dict[str, int] = field(default_factory=dict)

    def timings(self) -> dict[str, float]:
        """The job's summary as its timings carry it ("StepCacheSkipped/<expert>": k of n forwards)."""
        out: dict[str, float] = {}
        for name, n in self.forwards.items():
            out[f"StepCacheSkipped/{name}"] = float(self.skipped.get(name, 0))
            out[f"StepCacheForwards/{name}"] = float(n)
        return out

    def describe(self) -> str:
        return ", ".join(f"{name} {self.skipped.get(name, 0)}/{n}" for name, n in self.forwards.items())


class StepCache:
    """The pipeline's step cache: installed on its experts once, used step by step by each job."""

    def __init__(self, spec: CacheSpec, family: str, expert_names: tuple[str, ...]) -> None:
        if not spec.enabled:
            raise ValueError("a StepCache needs a backend")
        self.spec = spec
        self.family = family
        self.expert_names = expert_names
        self.blocks: dict[int, CachedBlocks] = {}
        self.policy: TeaCache | MagCache | None = None
        self.agree: Agree = _alone
        self.stats = JobCacheStats()
        self.local_votes: list[bool] = []
        """This rank's own wish per step, before agreement (tests read it)."""
        self.decisions: list[bool] = []
        """The agreed decision per step: True computes."""
        self._expert: int | None = None
        self._compute = True
        self._forward = 0
        self._active = False
        self._branches = 1
        self._residuals: dict[int, torch.Tensor] = {}
        self._inputs: dict[int, torch.Tensor] = {}

    def install(self, experts: list) -> None:
        """Wrap each expert's blocks (after parallelize and compile: the compiled blocks stay as
        they are). `experts` are the pipeline's: `ParallelExpert`s (their `blocks`) or whole experts
        (their diffusers module's `blocks`)."""
        for index, expert in enumerate(experts):
            owner = expert if hasattr(expert, "blocks") else expert.model
            if isinstance(owner.blocks, CachedBlocks):  # another cache's: this one takes it over
                owner.blocks._cache = self
            else:
                owner.blocks = CachedBlocks(owner.blocks, self, index)
            self.blocks[id(expert)] = owner.blocks

    # -- a job ------------------------------------------------------------------------------------

    def begin_job(
        self, threshold: float | None, width: int, height: int, branches: int, agree: Agree | None = None
    ) -> None:
        """Fresh state for a job: the policy with the backend's defaults, the config's values, and
        the request's `cache_threshold` over both; `branches` forwards make up one step."""
        options = self.spec.options()
        table = published_table(self.family, width, height)
        if self.spec.backend == "tea_cache":
            self.policy = TeaCache(
                threshold if threshold is not None else options.get("rel_l1_thresh", TEACACHE_THRESHOLD),
                options.get("coefficients", TEACACHE_COEFFICIENTS[table]),
                options.get("ret_steps", TEACACHE_RET_STEPS),
            )
        else:
            self.policy = MagCache(
                threshold if threshold is not None else options.get("magcache_thresh", MAGCACHE_THRESHOLD),
                options.get("magcache_K", MAGCACHE_K),
                options.get("retention_ratio", MAGCACHE_RETENTION.get(self.family, 0.2)),
                options.get("mag_ratios", MAGCACHE_RATIOS[table]),
            )
        self.agree = agree or _alone
        self.stats = JobCacheStats()
        self.local_votes, self.decisions = [], []
        self._expert = None
        self._branches = branches
        self._residuals.clear()
        self._inputs.clear()

    def begin_step(self, step: int, total: int, t: torch.Tensor, model) -> None:
        """Decide (and agree) whether this step's forwards compute the blocks or reuse residuals."""
        blocks = self.blocks[id(model)]
        if blocks.expert != self._expert:  # a new expert: its first step computes, nothing carries over
            self._expert = blocks.expert
            self.policy.reset()
            self._residuals.clear()
        modulated = modulated_timestep(model.model, t) if isinstance(self.policy, TeaCache) else None
        wants = self.policy.wants_compute(step, total, modulated) or not self._residuals
        compute = self.agree(step, wants)  # True when any rank wants to compute
        if compute:
            self.policy.computed()
        self.local_votes.append(wants)
        self.decisions.append(compute)
        name = self.expert_names[blocks.expert]
        self.stats.forwards[name] = self.stats.forwards.get(name, 0) + self._branches
        if not compute:
            self.stats.skipped[name] = self.stats.skipped.get(name, 0) + self._branches
        self._compute, self._forward, self._active = compute, 0, True

    def end_step(self) -> None:
        self._active = False

    def end_job(self) -> JobCacheStats:
        """Free the residuals; the job's summary (logged with --enable-cache-dit-summary)."""
        self._residuals.clear()
        self._inputs.clear()
        self._active = False
        if self.spec.summary:
            log.info("step cache %s skipped %s transformer forwards", self.spec.backend, self.stats.describe())
        return self.stats

    # -- the blocks' side -------------------------------------------------------------------------

    def plan(self, blocks: CachedBlocks) -> Iterator[Callable]:
        """What one forward of `blocks` runs: the blocks between marks, or the cached residual."""
        slot = self._forward  # the k-th forward of a step: the same guidance branch every step
        self._forward += 1
        if self._compute or slot not in self._residuals:
            yield _Mark(self, slot, first=True)
            yield from nn.ModuleList.__iter__(blocks)
            yield _Mark(self, slot, first=False)
        else:
            yield _Reuse(self, slot)


class _Mark:
    """Records the blocks' input (first) or, after them, the residual output - input (this rank's tokens)."""

    def __init__(self, cache: StepCache, slot: int, first: bool) -> None:
        self.cache, self.slot, self.first = cache, slot, first

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.first:
            self.cache._inputs[self.slot] = hidden_states
        else:
            self.cache._residuals[self.slot] = hidden_states - self.cache._inputs.pop(self.slot)
        return hidden_states


class _Reuse:
    """Stands in for all the blocks on a skipped step: input + the branch's cached residual."""

    def __init__(self, cache: StepCache, slot: int) -> None:
        self.cache, self.slot = cache, slot

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + self.cache._residuals[self.slot]


class CachedBlocks(nn.ModuleList):
    """An expert's blocks (the same modules under the same names) that a step cache may skip.

    Outside a step (loading, parallelize, compile, state dicts) it iterates as the plain list; inside
    one, each iteration is one forward, planned by the cache."""

    def __init__(self, blocks, cache: StepCache, expert: int) -> None:
        super().__init__(blocks)
        self._cache = cache
        self.expert = expert

    def __iter__(self) -> Iterator[nn.Module]:
        if not self._cache._active:
            return super().__iter__()
        return self._cache.plan(self)


def modulated_timestep(model: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(1, 6 x D) float32: the expert's modulated timestep embedding of scalar t, computed as its
    condition embedder computes it ("e0"); the same on every rank (these weights are whole)."""
    embedder = model.condition_embedder
    proj = embedder.timesteps_proj(t.reshape(1).to(torch.float32))
    dtype = next(iter(embedder.time_embedder.parameters())).dtype
    temb = embedder.time_embedder(proj.to(dtype))
    return embedder.time_proj(embedder.act_fn(temb)).float()


def residual_bytes(tokens: int, hidden_dim: int, dtype_bytes: int, branches: int, token_parts: int = 1) -> int:
    """Bytes one rank holds for cached residuals during a job (for a memory plan): one (1, S / parts,
    D) residual per guidance branch it runs. A14B at 832x480x81 (32,760 tokens, D 5120, bf16, CFG on
    one GPU): 2 x 335 MB."""
    return -(-tokens // token_parts) * hidden_dim * dtype_bytes * branches
