"""The offload paths on the tiny model: the same code moves weights between host copies and the
"device" on the CPU as on CUDA, and the frames must not change."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import EXAMPLE_IMAGE
from wan_spmd.config import generation_defaults, inspect_model_folder
from wan_spmd.models import load_components
from wan_spmd.params import resolve_params
from wan_spmd.pipeline import WanVideoPipeline
from wan_spmd.placement import HostResident, make_placement, module_bytes, peak_memory, resident_weights

CPU = torch.device("cpu")


def _frames(folder, placement: str, image: bool = True) -> tuple[torch.Tensor, WanVideoPipeline]:
    info = inspect_model_folder(folder)
    params = resolve_params(
        {"prompt": "a kite", "seed": 5, "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 3.0},
        info=info,
        defaults=generation_defaults(info),
        image=EXAMPLE_IMAGE.read_bytes() if image else None,
    )
    comps = load_components(info, CPU)
    pipe = WanVideoPipeline(comps, info, CPU, placement=make_placement(comps, CPU, placement))
    # two requests: the second finds every offloaded part back on the host, as a server's next job
    pipe(params)
    return pipe(params).frames, pipe


@pytest.mark.parametrize("placement", ["text_encoder", "experts"])
def test_offload_plans_give_the_resident_frames(tiny_i2v, placement):
    """If this fails, an offload plan changes the video: a weight came back stale or to the wrong
    module, an expert ran while its weights were on the host copy being replaced, or the expert
    switch loaded the wrong expert (I2V-A14B's two experts both run in 4 steps at boundary 0.9)."""
    resident, _ = _frames(tiny_i2v, "resident")
    moved, pipe = _frames(tiny_i2v, placement)
    assert torch.equal(resident, moved)
    assert resident.float().std() > 2  # real frames, not a constant
    # between requests the offloaded parts wait on their host copies, the rest stays put
    offload = pipe.placement
    assert offload.text_encoder is not None and not offload.text_encoder.on_device
    assert all(not e.on_device for e in offload.experts)
    assert len(offload.experts) == (2 if placement == "experts" else 0)


def test_one_expert_family_offloads_too(tiny_ti2v):
    """If this fails, the expert offload assumes two experts (TI2V-5B has one)."""
    resident, _ = _frames(tiny_ti2v, "resident", image=False)
    moved, _ = _frames(tiny_ti2v, "experts", image=False)
    assert torch.equal(resident, moved)


def test_host_resident_points_weights_at_separate_copies(tiny_i2v):
    """If this fails, offloading shares storage between the host copy and the device tensors (a
    later write to one would change the other), or a round trip loses a weight."""
    comps = load_components(inspect_model_folder(tiny_i2v), CPU)
    module = comps.text_encoder
    before = {k: v.clone() for k, v in module.state_dict().items()}
    moved = HostResident(module, CPU)
    table, name = moved.slots[0]
    first = table[name]
    assert len(moved.slots) == len({id(t) for t in (*module.parameters(), *module.buffers())})  # tied: once
    moved.offload()
    assert first.data_ptr() == moved.host[0].data_ptr()
    moved.load()
    assert first.data_ptr() != moved.host[0].data_ptr()
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_resident_weights_by_component_on_the_cpu(tiny_i2v):
    """If this fails, the ready line's resident weights miss a component or count bytes wrongly; on
    the CPU no peak GPU memory may be reported (None, never a made-up number)."""
    comps = load_components(inspect_model_folder(tiny_i2v), CPU)
    weights = resident_weights(comps)
    assert list(weights) == ["transformer", "transformer_2", "text_encoder", "vae"]
    expected = sum(p.numel() * p.element_size() for p in comps.vae.parameters())
    expected += sum(b.numel() * b.element_size() for b in comps.vae.buffers())
    assert weights["vae"] == {"cpu": expected} == module_bytes(comps.vae)
    assert peak_memory(CPU) is None
