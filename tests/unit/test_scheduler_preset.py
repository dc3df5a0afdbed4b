"""The `scheduler = "euler"` preset key and the 4-step distillation preset against diffusers.

If these fail, the 4-step preset samples other timesteps than the ones lightx2v's LoRAs were
distilled for (1000, 937.5, 833.3, 625 at shift 5), or our loop with flow-matching Euler drifts
from diffusers' pipeline driving diffusers' FlowMatchEulerDiscreteScheduler.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tests.conftest import EXAMPLE_IMAGE
from tests.diffusers_ref import i2v_reference_latents
from wan_spmd.config import generation_defaults, inspect_model_folder
from wan_spmd.models import load_components
from wan_spmd.params import RequestError, resolve_params
from wan_spmd.pipeline import WanVideoPipeline, set_schedule

PRESET = "wan2.2-i2v-a14b-lightx2v-4step"


class EulerWithSigmas(FlowMatchEulerDiscreteScheduler):
    """diffusers' own Euler scheduler, told the uniform sigmas lightx2v samples (its pipeline calls
    set_timesteps(n) and has no way to pass them)."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        sigmas = [1.0 - i / num_inference_steps for i in range(num_inference_steps)]
        super().set_timesteps(sigmas=sigmas, device=device)


def test_preset_gives_lightx2v_timesteps(tiny_i2v):
    """4 steps, guidance 1 on both experts, shift 5, Euler: the published settings."""
    info = inspect_model_folder(tiny_i2v)
    defaults = generation_defaults(info, PRESET)
    params = resolve_params({"prompt": "x"}, info=info, defaults=defaults, image=EXAMPLE_IMAGE.read_bytes())
    assert (params.num_inference_steps, params.guidance_scale, params.guidance_scale_2) == (4, 1.0, 1.0)
    assert (params.flow_shift, params.scheduler) == (5.0, "euler")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=params.flow_shift)
    set_schedule(scheduler, params, torch.device("cpu"))
    assert torch.allclose(scheduler.timesteps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))
    # lightx2v's boundary_step_index 2: the first two steps on the high-noise expert (t >= 900)
    assert int((scheduler.timesteps >= 0.9 * 1000).sum()) == 2


def test_unknown_scheduler_is_refused():
    from wan_spmd.config import REAL_MODELS

    info = REAL_MODELS["wan2.2-t2v-a14b"]
    with pytest.raises(RequestError, match="scheduler must be one of default, euler, got 'ddim'"):
        resolve_params({"prompt": "x", "scheduler": "ddim"}, info=info, defaults=generation_defaults(info))


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_euler_matches_diffusers(tiny_i2v, guidance):
    """Our loop with scheduler=euler equals diffusers' WanImageToVideoPipeline with diffusers'
    FlowMatchEulerDiscreteScheduler on the same sigmas (latents within 1e-4)."""
    info = inspect_model_folder(tiny_i2v)
    comps = load_components(info, torch.device("cpu"))
    request = {"prompt": "a kite", "seed": 9, "guidance_scale": guidance, "guidance_scale_2": guidance}
    params = resolve_params(
        request, info=info, defaults=generation_defaults(info, PRESET), image=EXAMPLE_IMAGE.read_bytes()
    )
    ours = WanVideoPipeline(comps, info, torch.device("cpu")).generate_latents(params).latents
    theirs = i2v_reference_latents(comps, params, scheduler=EulerWithSigmas(shift=params.flow_shift))
    assert (ours - theirs).abs().max().item() <= 1e-4
    unipc = resolve_params(
        {**request, "scheduler": "default"},
        info=info,
        defaults=generation_defaults(info, PRESET),
        image=EXAMPLE_IMAGE.read_bytes(),
    )
    other = WanVideoPipeline(comps, info, torch.device("cpu")).generate_latents(unipc).latents
    assert (ours - other).abs().max().item() > 1e-3  # the key changes the sampler
