"""Per-rank weight reads: each rank reads (or, for dummy weights, makes) only its slices of the
experts, so no rank ever holds a whole 14B expert in host or device memory.

Which slice a rank owns is the tensor-parallel plan's fact (`parallel.tp.planned_placement`); this
module only reads and attaches.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from wan_spmd.parallel.tp import attach_param, local_slice, planned_placement


class ExpertDeltas(Protocol):
    """What the loader asks of an expert's LoRA deltas (`lora.ExpertDeltas`) as it reads each slice."""

    def __contains__(self, name: str) -> bool: ...

    def add_to(self, name: str, local: torch.Tensor, index: tuple[slice, ...]) -> None:
        """local (fp32, slice `index` of parameter `name`) += every delta of that slice."""


def expert_on_meta(config: dict) -> nn.Module:
    """The expert's modules with parameters on the meta device (no memory); buffers (rotary tables)
    stay real, since they are computed, not loaded."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights(include_buffers=False):
        return WanTransformer3DModel.from_config(config)


def _own_copy(
    name: str, view: torch.Tensor, index, deltas: ExpertDeltas | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """This rank's slice as a tensor of its own, with its LoRA deltas (lora.py) added in fp32 to the
    checkpoint's values and cast once."""
    if deltas is None or name not in deltas:
        local = torch.empty(view.shape, dtype=dtype, device=device)
        return local.copy_(view)
    fused = view.to(device=device, dtype=torch.float32, copy=True)
    deltas.add_to(name, fused, index)
    return fused.to(dtype)


def load_expert_sharded(
    folder: Path,
    mesh: DeviceMesh | None,
    device: torch.device,
    dtype: torch.dtype,
    deltas: ExpertDeltas | None = None,
) -> nn.Module:
    """One expert from a diffusers folder, each rank reading only its slices (safetensors' slice
    reads), so no rank ever holds the whole 14B expert in host or device memory. `deltas` (LoRAs)
    are fused into each slice as it is read."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    model = expert_on_meta(config)
    index_file = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    else:
        weight_map = {}
    tp_rank, tp_size = (mesh.get_local_rank(), mesh.size()) if mesh is not None else (0, 1)
    by_file: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        by_file.setdefault(weight_map.get(name, "diffusion_pytorch_model.safetensors"), []).append(name)
    for file_name, names in by_file.items():
        with safe_open(folder / file_name, framework="pt", device="cpu") as f:
            for name in names:
                placement = planned_placement(name)
                tensor_slice = f.get_slice(name)
                shape = torch.Size(tensor_slice.get_shape())
                index = local_slice(shape, placement, tp_rank, tp_size)
                view = tensor_slice[index]  # of the mmap'd file
                # One copy into memory of our own: a view would keep the whole file mapped, and
                # touching it later would page in more than this rank's slice.
                local = _own_copy(name, view, index, deltas, device, dtype)
                attach_param(model, name, local, placement, mesh)
    return model.to(device).eval()


def random_weight(name: str, shape: torch.Size, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A random weight drawn on the device from a generator seeded by its name: normal(0, 0.02), norm
    scales 1. The same on every rank, so replicated weights agree without a broadcast."""
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, device=device, dtype=dtype)
    generator = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype)


def dummy_expert_sharded(
    config: dict,
    mesh: DeviceMesh | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    deltas: ExpertDeltas | None = None,
) -> nn.Module:
    """The real architecture with random weights made straight on the device, already sharded
    (`--load-format dummy`). Each weight is drawn whole from a generator seeded by its name, one at
    a time, then sliced: every rank and every TP size sees the same weights, so TP=2 can be
    compared with TP=1."""
    model = expert_on_meta(config)
    tp_rank, tp_size = (mesh.get_local_rank(), mesh.size()) if mesh is not None else (0, 1)
    for name, meta in list(model.named_parameters()):
        placement = planned_placement(name)
        full = random_weight(name, meta.shape, device, dtype, seed)
        index = local_slice(meta.shape, placement, tp_rank, tp_size)
        local = _own_copy(name, full[index], index, deltas, device, dtype)
        del full
        attach_param(model, name, local, placement, mesh)
    return model.to(device).eval()
