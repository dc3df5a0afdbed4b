"""Where a loaded model's bytes are, per rank: GPU memory peaks and resident weights by component.

The planner (`memory.py`) decides before loading; this module measures what is there once loaded
and while a job runs. Torch's caching allocator keeps the peaks per device: a job resets them at its
start and reads them at its end, so each job's figure is its own (the runtime then takes the maximum
over ranks).
"""

from __future__ import annotations

import torch

from wan_spmd.memory import MIB, PeakMemory

COMPONENTS = ("transformer", "transformer_2", "text_encoder", "vae")
"""The components that hold weights, in the model folder's names."""


def reset_peak_memory(device: torch.device) -> None:
    """Start counting a job's peak from what is held now (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> PeakMemory | None:
    """The peak since `reset_peak_memory`; None on the CPU, which has no allocator statistics (a
    number there would be made up)."""
    if device.type != "cuda":
        return None
    return PeakMemory(torch.cuda.max_memory_allocated(device) / MIB, torch.cuda.max_memory_reserved(device) / MIB)


def module_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of a module's parameters and buffers by where they live ("cuda:0", "cpu"), this rank's
    own: a sharded (DTensor) weight counts its local shard only."""
    by_device: dict[str, int] = {}
    seen: set[int] = set()
    for tensor in (*module.parameters(), *module.buffers()):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if id(local) in seen:
            continue
        seen.add(id(local))
        key = str(local.device)
        by_device[key] = by_device.get(key, 0) + local.numel() * local.element_size()
    return by_device


def resident_weights(components) -> dict[str, dict[str, int]]:
    """{component: {device: bytes}} of this rank's weights (parameters and buffers), for the
    components a family has (`transformer_2` only with two experts)."""
    parts = {
        "transformer": components.experts[0],
        "transformer_2": components.experts[1] if len(components.experts) > 1 else None,
        "text_encoder": components.text_encoder,
        "vae": components.vae,
    }
    return {name: module_bytes(module) for name, module in parts.items() if module is not None}


def describe_resident(rank: int, weights: dict[str, dict[str, int]]) -> str:
    """One line: `rank 0: transformer 13.4 GiB cuda:0, text_encoder 10.6 GiB cpu, ...`."""
    parts = []
    for name, by_device in weights.items():
        for device, size in by_device.items():
            parts.append(
                f"{name} {size / 2**30:.2f} GiB on {device}"
                if size >= 2**30
                else f"{name} {size / MIB:.1f} MiB on {device}"
            )
    return f"rank {rank}: " + ", ".join(parts)
