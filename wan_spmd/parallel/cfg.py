"""CFG-parallel: the two guidance branches on two rank groups, one exchange per step.

With guidance on, a denoising step is two forwards (conditional, unconditional) that need nothing
from each other. Group 0 of the mesh's cfg axis runs the conditional branch for the whole loop,
group 1 the unconditional one; each holds both experts, split by its own tp/ulysses. After each
forward one all-gather over the cfg axis gives every rank both predictions, and every rank combines
them and takes the same scheduler step (same inputs, same arithmetic: the latents never diverge).

With guidance off (the 4-step distillation LoRAs) there is one forward per step. Both groups hold
the same shards, so the cfg axis joins the ulysses axis as one wider sequence split for that request
(`ulysses.sequence_group(wide=True)`), where the heads allow it; otherwise both groups run the
same forward (no speed-up, same result; logged once at load).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from wan_spmd.launch import ParallelLayout
from wan_spmd.parallel.ulysses import can_widen, sequence_group

log = logging.getLogger("wan_spmd")

BRANCHES = ("cond", "uncond")
"""The branch each cfg group runs, by its index on the cfg axis."""


def cfg_branch(mesh: DeviceMesh | None, layout: ParallelLayout) -> str | None:
    """The guidance branch this rank's group runs, or None when every rank runs both."""
    if mesh is None or layout.cfg == 1:
        return None
    return BRANCHES[mesh["cfg"].get_local_rank()]


class CfgParallel:
    """`NoisePredictor` for a cfg axis of 2: this group's branch, then one all-gather of the noise
    predictions over the cfg axis."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.group = mesh["cfg"].get_group()
        self.branch = BRANCHES[mesh["cfg"].get_local_rank()]

    def __call__(
        self,
        model: torch.nn.Module,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor | None,
        negative_embeds: torch.Tensor | None,
        guidance: float | None,
    ) -> torch.Tensor:
        if guidance is None:  # one forward: every rank needs the conditional prompt
            with sequence_group(model, wide=can_widen(model)):
                return model(
                    hidden_states=model_input, timestep=timestep, encoder_hidden_states=prompt_embeds, return_dict=False
                )[0]
        embeds = prompt_embeds if self.branch == "cond" else negative_embeds
        local = model(hidden_states=model_input, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        both = funcol.all_gather_tensor(local.contiguous(), 0, self.group)  # (2B, C, T, h, w): cond, uncond
        noise_pred, noise_uncond = both.chunk(2, dim=0)
        # serial_cfg's formula, term for term, so the result is the same bits
        return noise_uncond + guidance * (noise_pred - noise_uncond)
