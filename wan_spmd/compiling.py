"""Regional compilation of the experts: each repeated transformer block compiled once, reused by all.

Compiling the blocks (not the whole model) is what diffusers' `compile_repeated_blocks` does: the
40 blocks share one graph, so compile time is one block's, and the rotary tables, embeddings and
output projection stay eager. `fullgraph=True` turns a graph break into an error instead of a
silent fallback; the tensor-parallel and Ulysses collectives are functional collectives so they
trace, and what varies per forward (the token group, the true token count) is an argument or a
shape, never a Python attribute dynamo would guard on.

Shapes: torch's automatic dynamic shapes. The first shape a block sees compiles a static graph; a
second one recompiles with a symbolic sequence length that then serves every later size. So two
warm-up shapes (the preset's and any other) leave no request a compile to pay; a request that
still pays one is logged and says so in its timings (`NewCompiledGraphs`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("wan_spmd")

RECOMPILE_LIMIT = 8
"""Graphs one block may compile, set on each compiled block (dynamo's own default is also 8; the
global setting is left alone). A block (`parallel.blocks.WanBlock`, shared by every block of both
experts) compiles one static and one dynamic-sequence graph per token group it runs with: the
ulysses axis or none, and under CFG-parallel the wide group, so at most 4. Past the limit,
`fullgraph=True` makes dynamo raise instead of silently running the block eagerly."""


def compile_blocks(expert, backend: str | Callable[..., Any] = "inductor", fullgraph: bool = True):
    """Compile every block of one expert in place (after parallelize and LoRA fusing): a
    `ParallelExpert`'s blocks, or a diffusers expert's own (benchmarks). `backend`: a torch.compile
    backend's name, or a callable one (the engine's `compile_cache.CachedBackend`)."""
    kwargs = {"backend": backend, "fullgraph": fullgraph}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch >= 2.13
        kwargs["recompile_limit"] = RECOMPILE_LIMIT
    for block in expert.blocks:
        block.compile(**kwargs)
    return expert


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (to tell whether a request paid a compile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def resolve_compile(want: bool | None, device: torch.device) -> bool:
    """--compile/--no-compile; by default on for CUDA (minutes of GPU time saved per hour) and off
    on the CPU, where CI has no time for inductor."""
    return device.type == "cuda" if want is None else want
