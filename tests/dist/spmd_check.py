"""A test-owned SPMD program, run by the dist tests under a real torchrun (gloo) and alone (N=1).

Modes:
  tp OUT      run the tiny I2V and T2V models; rank 0 saves latents and float video, every rank
              writes its parameter counts for the sharded layers
  tp_ti2v OUT the tiny TI2V model without an image (12 tokens: the sequence regions split them, and
              the per-token modulation with them) and with one (9 tokens: uneven, padded to 10); rank 0
              saves latents and float video
  attn OUT    one attention module sharded by the TP plan vs the same module whole
  compile_ti2v OUT  the tiny TI2V model's compiled blocks against eager, text and image
  dummy OUT   a dummy-weight expert (tiny architecture) made already sharded
  lora OUT    the tiny I2V model and a dummy expert with the LoRA files the test left in OUT fused at
              load (OUT/high.safetensors on the high-noise expert at 0.7, OUT/all.safetensors on both)
  slow_decode OUT  rank 0 delivers for longer than the control timeout; the loop goes on
  layouts OUT L1,L2  each named parallel layout (LAYOUTS) on this world: the tiny I2V and T2V
              models with CFG on, guidance 1.0 and an odd token count (48x48: 27 tokens), decoded
              through the engine's decoder (the row-split VAE on more than one rank); rank 0 saves
              latents and frames, every rank its weight counts; with more than one rank also the
              row-split VAE against the same VAE whole (encode and decode, float)
  fault OUT   the SPMD loop over five jobs through the engine's real JobRunner, its fault seam making
              rank 1 fail in two of them (before the first step, and between steps) and rank 0 in
              its delivery of a third; rank 0 writes every outcome

`spmd_check.py MODE OUT [ARG]` runs one mode. `spmd_check.py many OUT MODE[:ARG] ...` runs several in
one process (one torchrun launch for all the checks of a world size: the tests share it), each in
OUT/MODE; every rank leaves OUT/MODE/ok-WORLD-RANK when a mode is done, or error-WORLD-RANK.txt with
the traceback and stops there (a rank that failed mid-collective leaves the others nothing to meet).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

from wan_spmd.config import generation_defaults
from wan_spmd.engine import EngineOptions, JobRunner, build_pipeline
from wan_spmd.process import finish_process, setup_logging, torchrun_env
from wan_spmd.jobs import Job, Outcome, StopLoop
from wan_spmd.launch import resolve_layout, resolve_model
from wan_spmd.params import resolve_params
from wan_spmd.runtime import init_dist, shutdown, spmd_loop, wait_for_all

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "example.png"
SHARDED = ("attn1.to_", "attn2.to_", "attn1.norm_", "attn2.norm_", "ffn.net.")


def tp_mesh(device: torch.device, tp_size: int):
    """A 1-D mesh over all ranks, for the checks of the TP plan alone."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (tp_size,), mesh_dim_names=("tp",))


def local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def params_for(info, **request):
    image = EXAMPLE.read_bytes() if info.family.takes_image else None
    return resolve_params(
        {"prompt": "a kite", "seed": 5, "guidance_scale_2": 2.0, **request},
        info=info,
        defaults=generation_defaults(info),
        image=image,
    )


def load_pipeline(d, info):
    """The engine's own loading path, with the default layout for this world size."""
    return build_pipeline(d, info, EngineOptions(layout=resolve_layout(d.world_size), device="cpu"))


def mode_tp(d, out: Path) -> None:
    counts = {}
    for name in ("tiny", "tiny-t2v"):
        info = resolve_model(name)
        pipe = load_pipeline(d, info)
        result = pipe(params_for(info))
        if d.is_main:
            torch.save({"latents": result.latents, "frames": result.frames}, out / f"{name}-{d.world_size}.pt")
        for expert, model in zip(("transformer", "transformer_2"), pipe.c.experts, strict=True):
            counts[f"{name}/{expert}"] = sum(
                local_numel(p) for n, p in model.blocks.named_parameters() if any(s in n for s in SHARDED)
            )
    (out / f"counts-{d.world_size}-{d.rank}.json").write_text(json.dumps(counts))


def mode_tp_ti2v(d, out: Path) -> None:
    info = resolve_model("tiny-ti2v")
    pipe = load_pipeline(d, info)
    image = EXAMPLE.read_bytes()
    cases = {
        "text": resolve_params({"prompt": "a kite", "seed": 5}, info=info, defaults=generation_defaults(info)),
        "image": resolve_params(
            {"prompt": "a kite", "seed": 6, "size": "32x96"}, info=info, defaults=generation_defaults(info), image=image
        ),
    }
    for case, params in cases.items():
        result = pipe(params)
        if d.is_main:
            torch.save({"latents": result.latents, "frames": result.frames}, out / f"ti2v-{case}-{d.world_size}.pt")


def mode_attn(d, out: Path) -> None:
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from wan_spmd.parallel import shard_block

    torch.manual_seed(0)
    whole = WanTransformerBlock(48, 64, 4, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6)
    with torch.no_grad():  # non-trivial q/k norm weights, so a wrong slice would show
        for attn in (whole.attn1, whole.attn2):
            attn.norm_q.weight.uniform_(0.5, 1.5)
            attn.norm_k.weight.uniform_(0.5, 1.5)
    sharded = WanTransformerBlock(48, 64, 4, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6)
    sharded.load_state_dict(whole.state_dict())
    shard_block(sharded, tp_mesh(d.device, d.world_size))
    x, context, temb = torch.randn(1, 20, 48), torch.randn(1, 7, 48) * 3, torch.randn(1, 6, 48) * 0.1
    with torch.no_grad():
        ref, got = whole(x, context, temb, None), sharded(x, context, temb, None)
    if d.is_main:
        result = {"max_abs": (ref - got).abs().max().item(), "ref_std": ref.std().item()}
        (out / "attn.json").write_text(json.dumps(result))


LAYOUTS = {
    "tp1": {},
    "tp2": {"tp": 2},
    "u2": {"ulysses": 2},
    "cfg": {"cfg_parallel": True},
    "cfg-tp2": {"cfg_parallel": True, "tp": 2},
    "tp2-u2": {"tp": 2, "ulysses": 2},
}
REQUESTS = {"cfg": {}, "g1": {"guidance_scale": 1.0, "guidance_scale_2": 1.0}, "odd": {"size": "48x48"}}


def mode_layouts(d, out: Path, names: str) -> None:
    for name in names.split(","):
        layout = resolve_layout(d.world_size, **LAYOUTS[name])
        counts = {}
        for model in ("tiny", "tiny-t2v"):
            info = resolve_model(model)
            pipe = build_pipeline(d, info, EngineOptions(layout=layout, device="cpu"))
            for request, extra in REQUESTS.items():
                state = pipe.generate_latents(params_for(info, **extra))
                frames = list(pipe.timed_decode(state))
                if d.is_main:
                    result = {"latents": state.latents, "frames": torch.cat([f.cpu() for f in frames])}
                    torch.save(result, out / f"{name}-{model}-{request}.pt")
            for expert, weights, layout_expert in zip(
                ("transformer", "transformer_2"), pipe.c.experts, pipe.experts, strict=True
            ):
                counts[f"{model}/{expert}"] = {
                    "all": sum(local_numel(p) for p in weights.parameters()),
                    "sharded": sum(
                        local_numel(p) for n, p in weights.blocks.named_parameters() if any(s in n for s in SHARDED)
                    ),
                    "widens": layout_expert.can_widen,
                }
        (out / f"counts-{name}-{d.rank}.json").write_text(json.dumps(counts))
    if d.world_size > 1:
        vae_split_error(d, pipe, out)


def vae_split_error(d, pipe, out: Path) -> None:
    """The row-split VAE against the same VAE whole (its wrappers pass through outside a split),
    on random inputs whose rows split evenly (8) and unevenly (6 latent rows over 4 ranks)."""
    vae, split = pipe.c.vae, pipe.vae_split
    gen = torch.Generator().manual_seed(3)
    result = {}
    with torch.inference_mode():
        for rows in (8, 6):
            latents = torch.randn(1, 16, 3, rows, 5, generator=gen)
            video = torch.rand(1, 3, 9, rows * 8, 40, generator=gen) * 2 - 1
            whole_dec = vae.decode(latents).sample
            whole_enc = vae.encode(video).latent_dist.mode()
            with split.split(rows) as (start, stop):
                band = vae.decode(latents[..., start:stop, :]).sample
                got_dec = split.all_rows(band)
            got_enc = split.encode(vae, video)
            result[f"rows{rows}"] = {
                "decode_max_abs": (whole_dec - got_dec).abs().max().item(),
                "decode_std": whole_dec.std().item(),
                "encode_max_abs": (whole_enc - got_enc).abs().max().item(),
                "encode_std": whole_enc.std().item(),
            }
    if d.is_main:
        (out / f"vae-{d.world_size}.json").write_text(json.dumps(result))


def mode_compile(d, out: Path, names: str = "") -> None:
    """The engine's compiled blocks (aot_eager, fullgraph: a graph break raises) against eager, per
    layout (LAYOUTS names; default: this world's default), at three sizes: the third must compile
    nothing new (the dynamic graph of the second serves it)."""
    from wan_spmd.compiling import compiled_graphs

    info = resolve_model("tiny")
    results = {}
    for name in names.split(",") if names else ["default"]:
        layout = resolve_layout(d.world_size, **LAYOUTS.get(name, {}))
        options = EngineOptions(layout=layout, device="cpu")
        eager = build_pipeline(d, info, options)
        compiled = build_pipeline(d, info, dataclasses.replace(options, compile=True, compile_backend="aot_eager"))
        result = {"max_abs": 0.0, "graphs": []}
        before = compiled_graphs()
        for size in ("64x64", "48x32", "80x48"):
            params = params_for(info, size=size, num_frames=5)
            ref, got = eager(params).latents, compiled(params).latents
            result["max_abs"] = max(result["max_abs"], (ref - got).abs().max().item())
            result["graphs"].append(compiled_graphs() - before)
        results[name] = result
    if d.is_main:
        (out / f"compile-{d.world_size}.json").write_text(json.dumps(results))


def mode_compile_ti2v(d, out: Path) -> None:
    """TI2V's per-token modulation through compiled blocks (aot_eager, fullgraph) against eager: text
    at 64x64 (tokens split over 2 ranks), image at 32x96 (uneven: padded) and 96x64."""
    info = resolve_model("tiny-ti2v")
    options = EngineOptions(layout=resolve_layout(d.world_size), device="cpu")
    eager = build_pipeline(d, info, options)
    compiled = build_pipeline(d, info, dataclasses.replace(options, compile=True, compile_backend="aot_eager"))
    max_abs = 0.0
    for size, image in (("64x64", None), ("32x96", EXAMPLE.read_bytes()), ("96x64", EXAMPLE.read_bytes())):
        request = {"prompt": "a kite", "seed": 1, "size": size, "num_frames": 5}
        params = resolve_params(request, info=info, defaults=generation_defaults(info), image=image)
        max_abs = max(max_abs, (eager(params).latents - compiled(params).latents).abs().max().item())
    if d.is_main:
        (out / f"compile-ti2v-{d.world_size}.json").write_text(json.dumps({"max_abs": max_abs}))


def mode_dummy(d, out: Path) -> None:
    """Dummy weights made already sharded: the same model at every TP size (tiny architecture)."""
    from wan_spmd.loading import dummy_expert_sharded
    from wan_spmd.parallel import shard_expert
    from wan_spmd.tiny import tiny_transformer_config

    mesh = tp_mesh(d.device, d.world_size) if d.world_size > 1 else None
    model = dummy_expert_sharded(tiny_transformer_config(36), mesh, d.device, torch.float32, seed=1)
    if mesh is not None:
        shard_expert(model, mesh)
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 36, 3, 8, 8, generator=gen), torch.randn(1, 512, 32, generator=gen)
    with torch.inference_mode():
        result = model(hidden_states=x, timestep=torch.tensor([999.0]), encoder_hidden_states=context)[0]
    if d.is_main:
        torch.save(result, out / f"dummy-{d.world_size}.pt")


def mode_lora(d, out: Path) -> None:
    """LoRAs fused per slice: the same model at every TP size, from a folder and as dummy weights."""
    from wan_spmd.launch import parse_lora_spec
    from wan_spmd.lora import read_deltas
    from wan_spmd.loading import dummy_expert_sharded
    from wan_spmd.parallel import shard_expert
    from wan_spmd.tiny import tiny_transformer_config

    loras = (
        parse_lora_spec(f"{out / 'high.safetensors'}:0.7", "--lora-high"),
        parse_lora_spec(f"{out / 'all.safetensors'}:1.2", "--lora"),
    )
    info = resolve_model("tiny")
    options = EngineOptions(layout=resolve_layout(d.world_size), device="cpu", loras=loras)
    result = build_pipeline(d, info, options)(params_for(info))
    config = tiny_transformer_config(36)
    deltas, _ = read_deltas(loras, ("transformer",), config)
    mesh = tp_mesh(d.device, d.world_size) if d.world_size > 1 else None
    model = dummy_expert_sharded(config, mesh, d.device, torch.float32, 1, deltas["transformer"])
    if mesh is not None:
        shard_expert(model, mesh)
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 36, 3, 8, 8, generator=gen), torch.randn(1, 512, 32, generator=gen)
    with torch.inference_mode():
        dummy = model(hidden_states=x, timestep=torch.tensor([999.0]), encoder_hidden_states=context)[0]
    if d.is_main:
        torch.save({"latents": result.latents, "dummy": dummy}, out / f"lora-{d.world_size}.pt")


class ListSource:
    """A fixed list of jobs; records outcomes."""

    def __init__(self, jobs: list[Job], out: Path) -> None:
        self.jobs, self.out, self.records = list(jobs), out, []

    def next_job(self, timeout: float):
        return self.jobs.pop(0) if self.jobs else StopLoop

    def output_path(self, job: Job) -> Path:
        return self.out / f"{job.id}.mp4"

    stop_reason = None

    def check_stop(self, job: Job) -> bool:
        return False

    def request_stop(self, reason: str) -> None:
        pass

    def on_step(self, job: Job, step: int, total: int) -> None:
        pass

    def finish(self, outcome: Outcome) -> None:
        self.records.append({"id": outcome.job.id, "ok": outcome.ok, "error": outcome.error})
        (self.out / "fault.json").write_text(json.dumps(self.records))


def run_with_faults(d, out: Path, ids: tuple[str, ...], fault) -> int:
    info = resolve_model("tiny-t2v")
    pipe = load_pipeline(d, info)
    # the engine's decoder (row-split over the ranks): a delivery failure on rank 0 must not leave
    # the other ranks inside its collectives
    runner = JobRunner(pipe, d.rank, fault)
    jobs = [Job(i, params_for(info, size="32x32", num_frames=5)) for i in ids]
    source = ListSource(jobs, out) if d.is_main else None
    wait_for_all(d, timeout_s=120)  # as serve does: ranks load at their own pace before the loop
    return spmd_loop(d, runner, source, heartbeat_s=0.5)


def mode_slow_decode(d, out: Path) -> None:
    """Rank 0's delivery (decode and mp4, inside the job) of the first job takes longer (3 s) than the
    control timeout (2 s, a control group of this mode's own); the second job shows the loop goes on."""
    import time

    import torch.distributed as dist

    if d.world_size > 1:
        d = dataclasses.replace(d, control=dist.new_group(backend="gloo", timeout=timedelta(seconds=2)))

    def slow(stage: str, job: Job, rank: int) -> None:
        if stage == "deliver" and job.id == "slow-1":
            time.sleep(3.0)

    run_with_faults(d, out, ("slow-1", "slow-2"), slow)


def mode_fault(d, out: Path) -> None:
    def inject(stage: str, job: Job, rank: int) -> None:
        if rank == 1 and job.id == "fail-before" and stage == "start":
            raise RuntimeError("injected before the first step")
        if rank == 1 and job.id == "fail-mid" and stage == "step 2":
            raise RuntimeError("injected at step 2")
        if rank == 0 and job.id == "fail-decode" and stage == "deliver":
            raise RuntimeError("injected in decoding")

    ran = run_with_faults(d, out, ("ok-1", "fail-before", "fail-mid", "fail-decode", "ok-2"), inject)
    (out / f"ran-{d.rank}.json").write_text(json.dumps(ran))


MODES = {
    "tp": mode_tp,
    "tp_ti2v": mode_tp_ti2v,
    "attn": mode_attn,
    "fault": mode_fault,
    "dummy": mode_dummy,
    "lora": mode_lora,
    "slow_decode": mode_slow_decode,
    "compile": mode_compile,
    "layouts": mode_layouts,
    "compile_ti2v": mode_compile_ti2v,
}


def run_many(d, out: Path, specs: list[str]) -> int:
    """Each MODE[:ARG] in order, in OUT/MODE; stops at the first that raises (see the module's doc)."""
    for spec in specs:
        mode, _, arg = spec.partition(":")
        folder = out / mode
        folder.mkdir(parents=True, exist_ok=True)
        if "torch._dynamo" in sys.modules:
            # each mode compiles as a process of its own would: dynamo's recompile limits count per
            # code object, and the blocks of every mode share theirs
            sys.modules["torch._dynamo"].reset()
        started = time.monotonic()
        try:
            MODES[mode](d, folder, *([arg] if arg else []))
        except BaseException:
            (folder / f"error-{d.world_size}-{d.rank}.txt").write_text(traceback.format_exc())
            return 1
        # the seconds it took: where the shared launch's time goes (a slow mode shows here)
        (folder / f"ok-{d.world_size}-{d.rank}").write_text(f"{time.monotonic() - started:.1f}\n")
    return 0


if __name__ == "__main__":
    mode, out, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    rank, _, _ = torchrun_env()
    setup_logging(rank)
    d = init_dist("cpu")
    code = 0
    try:
        if mode == "many":
            code = run_many(d, out, extra)
        else:
            MODES[mode](d, out, *extra)
    finally:
        if code == 0:
            shutdown(d)
    finish_process(code)
