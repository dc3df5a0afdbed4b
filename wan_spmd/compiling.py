"""Regional compilation of the experts: each repeated transformer block compiled once, reused by all.

Compiling the blocks (not the whole model) is what diffusers' `compile_repeated_blocks` does: the
40 blocks share one graph, so compile time is one block's, and the rotary tables, embeddings and
output projection stay eager. `fullgraph=True` turns a graph break into an error instead of a
silent fallback; the tensor-parallel collectives are functional collectives so they trace.

Shapes: torch's automatic dynamic shapes. The first shape a block sees compiles a static graph; a
second one recompiles with a symbolic sequence length that then serves every later size. So two
warm-up shapes (the preset's and any other) leave no request a compile to pay; a request that
still pays one is logged and says so in its timings (`NewCompiledGraphs`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("wan_spmd")

RECOMPILE_LIMIT = 64
"""Per code object. The first and last blocks carry the sequence-region hooks (their own graphs),
and each has a static and a dynamic variant, with and without even sequence splits: well over
dynamo's default of 8, past which it would silently run eager."""


def compile_blocks(expert: nn.Module, backend: str = "inductor", fullgraph: bool = True) -> nn.Module:
    """Compile every block of one expert in place (after parallelize and LoRA fusing)."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 16 * RECOMPILE_LIMIT)
    # Ulysses keeps the request's true token count as an int beside its padded split; dynamo would
    # treat it as a constant and compile again for every new count.
    config.allow_unspec_int_on_nn_module = True
    for block in expert.blocks:
        block.compile(backend=backend, fullgraph=fullgraph)
    return expert


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (to tell whether a request paid a compile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def resolve_compile(want: bool | None, device: torch.device) -> bool:
    """--compile/--no-compile; by default on for CUDA (minutes of GPU time saved per hour) and off
    on the CPU, where CI has no time for inductor."""
    return device.type == "cuda" if want is None else want
