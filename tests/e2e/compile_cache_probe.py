"""A test-owned program: the tiny I2V model's blocks compiled with inductor into `--compile-cache`
DIR, warmed up at one shape; prints one JSON line with what the compile cost and a checksum of one
expert forward on fixed inputs (every run must compute the same numbers, cached or not).

    python tests/e2e/compile_cache_probe.py DIR [DEVICE]     # DEVICE: cpu (default) or cuda
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from wan_spmd.engine import EngineOptions, Startup, build_pipeline, measure_warm_up
from wan_spmd.launch import resolve_layout, resolve_model
from wan_spmd.process import setup_logging
from wan_spmd.runtime import init_dist

SHAPE = (32, 32, 5)


def main(folder: str, device: str = "cpu") -> None:
    setup_logging(0)
    torch.manual_seed(0)
    info = resolve_model("tiny")
    options = EngineOptions(layout=resolve_layout(1), device=device, compile=True, compile_cache=Path(folder))
    startup = Startup()
    pipe = build_pipeline(init_dist(device), info, options, startup=startup)
    measure_warm_up(pipe, (SHAPE,), startup)
    gen = torch.Generator().manual_seed(1)
    config = pipe.c.experts[0].config
    dtype, on = pipe.transformer_dtype, pipe.device
    hidden = torch.randn(1, config.in_channels, 2, 4, 4, generator=gen).to(on, dtype)
    text = torch.randn(1, 512, config.text_dim, generator=gen).to(on, dtype)
    with torch.inference_mode():
        out = pipe.experts[0](hidden, torch.tensor([500], device=on), text)
    result = {
        "graphs": startup.graphs,
        "cache_hits": startup.cache_hits,
        "fell_back": startup.cache.fell_back,
        "folder": str(startup.cache.folder),
        "checksum": float(out.double().abs().sum()),
        "ready": startup.describe(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
