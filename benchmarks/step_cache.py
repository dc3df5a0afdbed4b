"""Step caching on one GPU: each backend's default config against the uncached loop.

  python benchmarks/step_cache.py --out DIR            # dummy Wan2.2-I2V-A14B, 832x480x81, 40 steps
  python benchmarks/step_cache.py --out DIR --backends mag_cache --steps 20   # one backend, fewer steps
  python benchmarks/step_cache.py --tiny --device cpu --out DIR   # the tiny model: a dry run

Builds the real I2V-A14B configuration with random bf16 weights (`--load-format dummy`) through the
engine's own one-rank path (parallelize, compiled blocks: inductor; aot_eager with --tiny), warms
up, then runs the same request uncached and with each backend (tea_cache, mag_cache) at its default
config, and reports per backend k of n transformer forwards skipped, the Denoising and PipelineWall
times, and the Denoising ratio against the bound (n - k) / n + 0.03 (the machinery may cost at
most 3%).

Random weights say nothing about quality or about hit rates on real weights: TeaCache's decision
reads the timestep embedding's change through a polynomial fitted on real Wan weights, and MagCache
follows a curve calibrated on real ones; the skip counts here only show what the machinery costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

BACKENDS = ("tea_cache", "mag_cache")


def build(tiny: bool, device: str):
    """The engine's own one-rank pipeline (parallelize, compile), uncached."""
    from wan_spmd.config import REAL_MODELS
    from wan_spmd.engine import EngineOptions, build_pipeline
    from wan_spmd.launch import resolve_model
    from wan_spmd.runtime import init_dist

    d = init_dist(device)
    info = resolve_model("tiny") if tiny else REAL_MODELS["wan2.2-i2v-a14b"]
    options = EngineOptions(
        device=device,
        load_format="auto" if tiny else "dummy",
        compile=True,
        compile_backend="aot_eager" if tiny else "inductor",
    )
    return info, build_pipeline(d, info, options)


def request(info, tiny: bool, steps: int):
    from wan_spmd.config import generation_defaults
    from wan_spmd.params import resolve_params

    width, height, frames = (64, 64, 9) if tiny else (832, 480, 81)
    image = (Path(__file__).resolve().parents[1] / "examples" / "example.png").read_bytes()
    return resolve_params(
        {"prompt": "a kite over the sea", "seed": 1, "size": f"{width}x{height}", "num_frames": frames,
         "num_inference_steps": steps},
        info=info, defaults=generation_defaults(info), image=image,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny model (a CPU dry run of the code path)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (40; 10 with --tiny)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="which, beside the uncached baseline")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (the fastest counts)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from wan_spmd.launch import parse_cache_spec
    from wan_spmd.step_cache import StepCache

    info, pipe = build(args.tiny, args.device)
    device = pipe.device
    params = request(info, args.tiny, args.steps or (10 if args.tiny else 40))
    warm = dataclasses.replace(params, num_inference_steps=2)
    pipe.generate_latents(warm)  # compiles and allocator growth, paid here

    def run() -> dict[str, float]:
        runs = []
        for _ in range(args.repeats):
            state = pipe.generate_latents(params)
            list(pipe.timed_decode(state))
            runs.append(state.timer.ms)
        return min(runs, key=lambda ms: ms["Denoising"])

    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result["versions"] = {"torch": torch.__version__}
    result["request"] = {"size": params.size, "frames": params.num_frames, "steps": params.num_inference_steps}
    pipe.step_cache = None
    base = run()
    result["none"] = {"Denoising_ms": base["Denoising"], "PipelineWall_ms": base["PipelineWall"]}
    measured = {}
    for backend in args.backends.split(","):
        cache = StepCache(parse_cache_spec(backend, None), info.family.name, info.family.expert_names)
        cache.install(pipe.experts)
        pipe.step_cache = cache
        pipe.generate_latents(warm)  # the marks' own first run
        measured[backend] = run()
    pipe.step_cache = None
    again = run()  # the baseline once more, after: the faster of the two counts
    if again["Denoising"] < base["Denoising"]:
        base = again
        result["none"] = {"Denoising_ms": base["Denoising"], "PipelineWall_ms": base["PipelineWall"]}
    for backend, ms in measured.items():
        k = sum(v for key, v in ms.items() if key.startswith("StepCacheSkipped/"))
        n = sum(v for key, v in ms.items() if key.startswith("StepCacheForwards/"))
        ratio = ms["Denoising"] / base["Denoising"]
        result[backend] = {
            "skipped": int(k),
            "forwards": int(n),
            "per_expert": {key: v for key, v in ms.items() if key.startswith("StepCache")},
            "Denoising_ms": ms["Denoising"],
            "PipelineWall_ms": ms["PipelineWall"],
            "denoising_ratio": ratio,
            "bound": (n - k) / n + 0.03,
            "within_bound": ratio <= (n - k) / n + 0.03,
        }
        print(f"{backend}: skipped {int(k)}/{int(n)} forwards, denoising {ratio:.3f} of uncached "
              f"(bound {(n - k) / n + 0.03:.3f})", flush=True)  # fmt: skip
    result["date"] = time.strftime("%Y-%m-%d")
    (args.out / "step_cache.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
