"""Where a loaded model's bytes are, per rank: GPU memory peaks and resident weights by component.

The planner (`memory.py`) decides before loading; this module measures what is there once loaded
and while a job runs. Torch's caching allocator keeps the peaks per device: a job resets them at its
start and reads them at its end, so each job's figure is its own (the runtime then takes the maximum
over ranks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


# ---------------------------------------------------------------------------------------------
# Offload: weights that wait in (pinned) host memory and come to the device for their stage


class HostResident:
    """One module whose weights have a permanent host copy (pinned on CUDA, so copies to the device
    run asynchronously) and visit the device only when asked.

    Going to the host costs nothing: the weights never change, so the parameters are simply pointed
    back at the host copy and the device memory is freed. Coming back, `prefetch` allocates the
    device tensors on the current stream and copies into them on a side stream; `load` makes the
    current stream wait for that copy and points the parameters at the device tensors. On the CPU the
    "device" tensors are separate copies made by the same code (no stream, no pinning), so a test
    there runs the same path. Only plain tensors are moved: a tensor-parallel (DTensor) expert
    stays where it is (the planner does not offload experts under --tp).
    """

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device
        self.slots: list[tuple[dict[str, torch.Tensor], str]] = []
        seen: set[int] = set()  # a tied weight (UMT5's shared embedding) is one tensor, moved once
        for owner in module.modules():
            for table in (owner._parameters, owner._buffers):
                for name, tensor in table.items():
                    if tensor is not None and id(tensor) not in seen:
                        seen.add(id(tensor))
                        self.slots.append((table, name))
        if any(hasattr(table[name], "to_local") for table, name in self.slots):
            raise ValueError("a tensor-parallel (sharded) module cannot be offloaded to host memory")
        pin = device.type == "cuda"
        self.host = [self._host_copy(table[name], pin) for table, name in self.slots]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.on_device = True
        self._pending: list[torch.Tensor] | None = None
        self._copied: torch.cuda.Event | None = None

    @staticmethod
    def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        host.copy_(tensor.detach())
        return host

    def _point_at(self, tensors: list[torch.Tensor]) -> None:
        for (table, name), tensor in zip(self.slots, tensors, strict=True):
            table[name].data = tensor

    def offload(self) -> None:
        """Point the weights at their host copy; the device memory goes back to the allocator."""
        if self.on_device:
            self._pending, self._copied = None, None
            self._point_at(self.host)
            self.on_device = False

    def prefetch(self) -> None:
        """Start bringing the weights to the device (asynchronous on CUDA: a side stream copies
        while the current stream goes on)."""
        if self.on_device or self._pending is not None:
            return
        # allocated on the current stream, which is the one that will use and later free them
        pending = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in self.host]
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for target, host in zip(pending, self.host, strict=True):
                    target.copy_(host, non_blocking=True)
                self._copied = torch.cuda.Event()
                self._copied.record(self.stream)
        else:
            for target, host in zip(pending, self.host, strict=True):
                target.copy_(host)
        self._pending = pending

    def load(self) -> None:
        """The weights are on the device for the current stream when this returns."""
        if self.on_device:
            return
        self.prefetch()
        if self._copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied)
        assert self._pending is not None
        self._point_at(self._pending)
        self._pending, self._copied = None, None
        self.on_device = True


class Offload:
    """The pipeline's placement seam for an offloading plan: the text encoder comes to the device for
    each request's prompt encoding and goes back after it; with `experts`, each expert is on the
    device only for its own denoising steps, the next one copied in on a side stream while the one
    before runs (the high-noise expert while the image condition is encoded, the low-noise one
    during the high-noise steps)."""

    def __init__(self, components, device: torch.device, text_encoder: bool = True, experts: bool = False) -> None:
        self.text_encoder = HostResident(components.text_encoder, device) if text_encoder else None
        self.experts = [HostResident(e, device) for e in components.experts] if experts else []
        self.running: int | None = None
        # at rest between requests, everything offloaded waits on the host
        if self.text_encoder is not None:
            self.text_encoder.offload()
        for expert in self.experts:
            expert.offload()

    @contextmanager
    def encoding(self) -> Iterator[None]:
        """Hold the text encoder on the device while the prompts are encoded."""
        if self.text_encoder is not None:
            self.text_encoder.load()
        try:
            yield
        finally:
            if self.text_encoder is not None:
                self.text_encoder.offload()
            if self.experts:
                self.experts[0].prefetch()  # the first steps' expert, behind the VAE encode

    def use_expert(self, index: int) -> None:
        """The next denoising step runs expert `index` (0: high noise, 1: low noise)."""
        if not self.experts or self.running == index:
            return
        if self.running is not None:
            self.experts[self.running].offload()
        self.experts[index].load()
        self.running = index
        if index + 1 < len(self.experts):
            self.experts[index + 1].prefetch()  # the next phase's expert, behind these steps

    def denoised(self) -> None:
        """The last step ran: the experts leave the device before the decode."""
        for expert in self.experts:
            expert.offload()
        self.running = None


def make_placement(components, device: torch.device, placement: str):
    """The pipeline's placement seam for a plan's placement name (None: everything resident)."""
    if placement == "resident":
        return None
    if placement == "text_encoder":
        return Offload(components, device, text_encoder=True)
    if placement == "experts":
        return Offload(components, device, text_encoder=True, experts=True)
    raise ValueError(f"placement {placement!r} is not carried out by this version")
