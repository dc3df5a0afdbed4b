"""CFG-parallel: the two guidance branches on two rank groups, one exchange per step.

With guidance on, a denoising step is two forwards (conditional, unconditional) that need nothing
from each other. Group 0 of the mesh's cfg axis runs the conditional branch for the whole loop,
group 1 the unconditional one; each holds both experts, split by its own tp/ulysses. After each
forward one all-gather over the cfg axis gives every rank both predictions, and every rank combines
them and takes the same scheduler step (same inputs, same arithmetic: the latents never diverge).

With guidance off (the 4-step distillation LoRAs) there is one forward per step. Both groups hold
the same shards, so the cfg axis joins the ulysses axis as one wider sequence split for that request
(`ParallelExpert(..., wide=True)`), where the heads allow it; otherwise both groups run the
same forward (no speed-up, same result; logged once at load).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from wan_spmd.parallel.expert import ParallelExpert

log = logging.getLogger("wan_spmd")

BRANCHES = ("cond", "uncond")
"""The branch each cfg group runs, by its index on the cfg axis."""


class CfgParallel:
    """`NoisePredictor` for a cfg axis of 2: this group's branch, then one all-gather of the noise
    predictions over the cfg axis."""

    def __init__(self, mesh: DeviceMesh) -> None:
        """`mesh`: the layout's (cfg, ulysses, tp) mesh."""
        self.group = mesh["cfg"].get_group()
        self.branch = BRANCHES[mesh["cfg"].get_local_rank()]

    def __call__(
        self,
        model: ParallelExpert,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor | None,
        negative_embeds: torch.Tensor | None,
        guidance: float | None,
    ) -> torch.Tensor:
        if guidance is None:  # one forward: every rank needs the conditional prompt
            return model(model_input, timestep, prompt_embeds, wide=model.can_widen)
        embeds = prompt_embeds if self.branch == "cond" else negative_embeds
        local = model(model_input, timestep, embeds)
        both = funcol.all_gather_tensor(local.contiguous(), 0, self.group)  # (2B, C, T, h, w): cond, uncond
        noise_pred, noise_uncond = both.chunk(2, dim=0)
        # serial_cfg's formula, term for term, so the result is the same bits
        return noise_uncond + guidance * (noise_pred - noise_uncond)
