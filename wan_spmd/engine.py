"""One per-rank lifecycle for every command (generate, batch, serve).

    join torchrun's job -> (rank 0) start the front -> load -> parallelize (and compile)
    -> agree -> warm up -> agree that every rank is ready -> SPMD loop -> teardown

with the same signal handling everywhere: SIGTERM/SIGINT stop the loop at the running job's next
denoising step (the front says what that means for its answer and exit status), and a main thread
still stuck in a collective after --stop-grace is ended by the shutdown watch. The commands differ
only in their `Front`, which exists on rank 0 alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from wan_spmd.config import ModelInfo
from wan_spmd.jobs import Job, JobSource
from wan_spmd.launch import LoraSpec, ParallelLayout, WarmupShape
from wan_spmd.options import default
from wan_spmd.runtime import (
    ControlPlane,
    ControlPlaneLost,
    Dist,
    JobReport,
    ShutdownWatch,
    init_dist,
    shutdown,
    spmd_loop,
    wait_for_all,
)

if TYPE_CHECKING:
    from wan_spmd.parallel.vae import Decoder
    from wan_spmd.pipeline import WanVideoPipeline

log = logging.getLogger("wan_spmd")


@dataclass(frozen=True)
class EngineOptions:
    """How every rank joins, loads and waits; the same flags on every command (options.py's rows
    that feed "engine", whose defaults these are)."""

    layout: ParallelLayout = ParallelLayout()
    device: str = default("device")
    load_format: str = default("load_format")
    """auto reads the folder's weights; dummy makes random ones (benchmarks without weights)."""
    collective_timeout_s: float = default("collective_timeout")
    """Bound on the default group's collectives (inside a job; idle ranks never wait there)."""
    heartbeat_timeout_s: float = default("heartbeat_timeout")
    """Bound on every control-plane call: a dead or stuck rank is noticed within it."""
    stop_grace_s: float = default("stop_grace")
    """After SIGTERM/SIGINT, how long the loop may take to stop before the process ends itself."""
    load_timeout_s: float = default("load_timeout")
    """How long ranks wait for each other to finish loading."""
    compile: bool | None = None
    """Compile the experts' blocks; None: on CUDA yes, on the CPU no (`compiling.resolve_compile`)."""
    compile_backend: str = "inductor"
    """`aot_eager` in CPU tests: traces the same graphs (a graph break still fails) without inductor."""
    warmup_shapes: tuple[WarmupShape, ...] | None = None
    """(width, height, frames) of the throwaway requests run before the ranks agree they are ready;
    None: `auto_warmup_shapes` when the blocks are compiled, none otherwise."""
    auto_warmup_shapes: tuple[WarmupShape, ...] = ()
    """The command's own choice: serve the preset's shape, generate its job's, batch its file's first two."""
    vae_dtype: str = default("vae_dtype")
    parallel_vae: bool = True
    """Split the VAE's encode and decode over every rank (rows of each frame, exact); False: rank 0
    decodes alone."""
    loras: tuple[LoraSpec, ...] = ()
    """LoRA files fused into the experts' slices at load, before compile and warm-up."""

    @property
    def heartbeat_s(self) -> float:
        """Idle heartbeat period, well inside the timeout that bounds the other ranks' wait."""
        return min(5.0, self.heartbeat_timeout_s / 4)


class Front(Protocol):
    """A command's rank-0 side: where jobs come from and how the command ends."""

    source: JobSource

    def start(self) -> None:
        """Before loading (serve listens here, so /health says 503 while loading); ValueError to fail."""

    def ready(self, world_size: int, warmup_s: float) -> None:
        """Every rank has loaded and warmed up (in `warmup_s` seconds)."""

    def on_signal(self, name: str) -> None:
        """SIGTERM/SIGINT arrived (shutdown watch's thread): stop admitting; the source's
        `request_stop` cancels the running job at its next step."""

    def stopped(self, lost: bool) -> None:
        """The loop ended (or never started): answer whatever still waits."""

    def on_expire(self, signal_name: str | None) -> None:
        """The main thread is stuck past the grace period; the process ends right after this."""

    def exit_code(self, jobs: int, signal_name: str | None) -> int:
        """The command's exit status after a clean stop (e.g. 1 if a job failed or was interrupted)."""


Fault = Callable[[str, Job, int], None]
"""A test seam: called as fault(stage, job, rank) with stage "start", "step N" before each step's
agreement, and "deliver" (rank 0); raising there injects a failure into the real runner."""


class JobRunner:
    """One job on this rank: denoise with the agreed step control, decode through the decode seam,
    and on rank 0 stream the frames into the mp4 at the path the front chose."""

    def __init__(self, pipe: WanVideoPipeline, decoder: Decoder, rank: int, fault: Fault | None = None) -> None:
        self.pipe = pipe
        self.decoder = decoder
        self.rank = rank
        self.fault = fault

    def __call__(
        self, job: Job, control: Callable[[int, int], bool], on_step: Callable[[int, int], None], output: Path | None
    ) -> JobReport:
        from wan_spmd.compiling import compiled_graphs
        from wan_spmd.deliver import deliver

        fault, rank = self.fault, self.rank
        graphs_before = compiled_graphs()
        if fault is not None:
            fault("start", job, rank)
            agreed = control

            def control(step: int, total: int) -> bool:
                fault(f"step {step}", job, rank)
                return agreed(step, total)

        state = self.pipe.generate_latents(job.params, control=control, on_step=on_step)
        if new_graphs := compiled_graphs() - graphs_before:
            # warm-up did not cover this shape (or the recompile limit was reached): say so
            log.warning("job %s paid for compiling %d new graph(s) (%s)", job.id, new_graphs, job.params.size)
            state.timer.ms["NewCompiledGraphs"] = float(new_graphs)
        chunks = self.pipe.timed_decode(state, self.decoder(self.pipe, state.latents))
        if output is None:  # not rank 0: take part in the decoder's collectives, keep nothing
            for _ in chunks:
                pass
            return JobReport(timings_ms=state.timer.ms)
        try:
            if fault is not None:
                fault("deliver", job, rank)
            frames_dir = job.meta.get("frames_dir")
            path, writer_ms = deliver(chunks, output, job.params, Path(frames_dir) if frames_dir else None)
        except Exception:
            # a parallel decoder's other ranks are inside its collectives until the last chunk:
            # finish the decode with them, then report the failure
            for _ in chunks:
                pass
            raise
        return JobReport(path, {**state.timer.ms, **writer_ms})


def build_pipeline(d: Dist, info: ModelInfo, options: EngineOptions) -> WanVideoPipeline:
    """Load this rank's part of the model and parallelize it as the layout says."""
    from wan_spmd.compiling import compile_blocks, resolve_compile
    from wan_spmd.models import Dtypes, load_components
    from wan_spmd.parallel import CfgParallel, build_mesh, cfg_branch, parallelize, tp_submesh
    from wan_spmd.parallel.vae import split_vae
    from wan_spmd.pipeline import WanVideoPipeline, serial_cfg
    from wan_spmd.tiny import quiet_hub_logging

    quiet_hub_logging()
    start = time.perf_counter()
    layout = options.layout
    mesh = build_mesh(layout, d.device)
    dtypes = Dtypes.for_device(d.device, vae=options.vae_dtype)
    components = load_components(
        info, d.device, dtypes, mesh=tp_submesh(mesh, layout), load_format=options.load_format, loras=options.loras
    )
    compiled = resolve_compile(options.compile, d.device)
    for expert in components.experts:
        parallelize(expert, mesh, layout, per_token_timesteps=info.family.expand_timesteps)
        if compiled:
            compile_blocks(expert, options.compile_backend)
    log.info(
        "loaded %s on %d rank(s) (%s%s) in %.1f s%s",
        info.path or info.config_name,
        d.world_size,
        layout.describe(),
        ", blocks compiled" if compiled else "",
        time.perf_counter() - start,
        "".join(f"; fused LoRA {spec.describe()}" for spec in options.loras),
    )
    # the VAE is whole on every rank: encode and decode split its rows over the world
    vae_split = split_vae(components.vae, d.world_size, d.rank) if options.parallel_vae else None
    return WanVideoPipeline(
        components,
        info,
        d.device,
        predict_noise=CfgParallel(mesh) if layout.cfg > 1 else serial_cfg,
        cfg_branch=cfg_branch(mesh, layout),
        encode_video=vae_split.encode if vae_split is not None else None,
    )


def warm_up(pipe: WanVideoPipeline, decoder: Decoder, shapes: tuple[WarmupShape, ...]) -> float:
    """One throwaway request per shape on every rank (text encode, VAE encode, a step of each
    expert with CFG, decode), so compiles, autotuning and allocator growth are paid before the
    ranks agree they are ready. Returns the seconds it took."""
    from wan_spmd.images import Pixels
    from wan_spmd.params import GenerationParams

    start = time.perf_counter()
    two_experts = len(pipe.c.experts) == 2
    for width, height, frames in shapes:
        params = GenerationParams(
            prompt="warm-up",
            negative_prompt="",
            image=Pixels(width, height, bytes([128]) * (width * height * 3)) if pipe.info.family.takes_image else None,
            width=width,
            height=height,
            num_frames=frames,
            fps=16,
            num_inference_steps=2,
            guidance_scale=5.0,  # CFG on: both branches (and the cfg-parallel exchange) run
            guidance_scale_2=5.0,
            # flow_shift 1 puts the 2 timesteps at 999 and 500: one on each side of 750
            boundary_ratio=0.75 if two_experts else None,
            flow_shift=1.0,
            seed=0,
        )
        state = pipe.generate_latents(params)
        for _ in pipe.timed_decode(state, decoder(pipe, state.latents)):
            pass
        log.info("warmed up %dx%dx%d", width, height, frames)
    return time.perf_counter() - start


def agree_all_ok(d: Dist, ok: bool) -> bool:
    """One control-plane all-reduce after start-up: it returns only once every rank got here, and
    says whether every rank is ready (loaded, and on rank 0 its front started)."""
    failed, _ = ControlPlane(d).any_flags(not ok, False)
    return not failed


def run_engine(info: ModelInfo, options: EngineOptions, front: Front | None, fault: Fault | None = None) -> int:
    """Every rank of every command: the whole lifecycle; returns the exit status.

    `front` is rank 0's (None elsewhere). 0 after a clean stop unless the front says otherwise,
    1 when a rank was lost or could not start.
    """
    d = init_dist(options.device, options.collective_timeout_s, options.heartbeat_timeout_s)
    engine = _Engine(d, info, options, front if d.is_main else None, fault)
    with ShutdownWatch(engine.on_signal, engine.on_expire, grace_s=options.stop_grace_s) as watch:
        code = engine.run(watch)
    engine.log_exit(code)
    return code


class _Engine:
    """One rank's run; the shutdown watch's callbacks reach the front through it."""

    def __init__(self, d: Dist, info: ModelInfo, options: EngineOptions, front: Front | None, fault: Fault | None):
        self.d = d
        self.info = info
        self.options = options
        self.front = front
        self.fault = fault
        self.signal_name: str | None = None

    def run(self, watch: ShutdownWatch) -> int:
        from wan_spmd.compiling import resolve_compile
        from wan_spmd.parallel.vae import decoder_for

        d, ok, lost = self.d, True, False
        try:
            # 1. Rank 0's front starts first (serve answers /health 503 while the model loads)
            if self.front is not None:
                try:
                    self.front.start()
                except ValueError as exc:
                    log.error("%s", exc)
                    ok = False
            # 2. Every rank loads its part, starting together: loading may hold default-group
            #    collectives (mesh set-up), and rank 0 has just spent a moment on its front
            wait_for_all(d, self.options.load_timeout_s)
            pipe = None
            if ok:
                try:
                    pipe = build_pipeline(d, self.info, self.options)
                except Exception:
                    log.exception("rank %d could not load the model", d.rank)
                    ok = False
            # 3. Wait for every rank however long loading takes and agree that all loaded
            wait_for_all(d, self.options.load_timeout_s)
            if not agree_all_ok(d, ok):
                if d.is_main:
                    log.error("not every rank loaded the model; stopping")
                return 1
            # 4. Warm up together (compiles are paid here, not by the first request), agree, loop
            decoder = decoder_for(pipe.c.vae, d.is_main)
            warm_s = 0.0
            shapes = self.options.warmup_shapes
            if shapes is None:
                shapes = self.options.auto_warmup_shapes if resolve_compile(self.options.compile, d.device) else ()
            if shapes:
                try:
                    warm_s = warm_up(pipe, decoder, shapes)
                except Exception:
                    log.exception("rank %d could not warm up", d.rank)
                    ok = False
                wait_for_all(d, self.options.load_timeout_s)
                if not agree_all_ok(d, ok):
                    if d.is_main:
                        log.error("not every rank warmed up; stopping")
                    return 1
            if self.front is not None:
                self.front.ready(d.world_size, warm_s)
            runner = JobRunner(pipe, decoder, d.rank, self.fault)
            source = self.front.source if self.front is not None else None
            jobs = spmd_loop(d, runner, source, self.options.heartbeat_s)
            return self.front.exit_code(jobs, self.signal_name) if self.front is not None else 0
        except ControlPlaneLost as exc:
            lost = True
            watch.expire_in()  # the teardown may wait on the lost peer too: bound it
            log.error("%s; exiting with status 1 for torchrun --max-restarts or a supervisor to restart", exc)
            return 1
        finally:
            if self.front is not None:
                self.front.stopped(lost)
            if not lost:  # destroying the group could wait on a lost peer
                shutdown(d)

    def on_signal(self, name: str) -> None:
        """The shutdown watch's thread, as soon as SIGTERM/SIGINT arrives."""
        self.signal_name = name
        if self.front is None:
            log.warning("%s: waiting for rank 0 to stop the loop", name)
            return
        log.info("%s: stopping at the running job's next step", name)
        self.front.on_signal(name)

    def on_expire(self, signal_name: str | None) -> None:
        """The main thread has not stopped within --stop-grace of a signal (or of a lost peer,
        None): it is stuck in a collective. The front sends its last answers; the watch then ends
        the process."""
        log.error(
            "rank %d: still not stopped %.0f s after %s (stuck in a collective with a lost rank?)",
            self.d.rank,
            self.options.stop_grace_s,
            signal_name or "losing a peer",
        )
        if self.front is not None:
            self.front.on_expire(signal_name)
        self.log_exit(1)

    def log_exit(self, code: int) -> None:
        """One line per rank with its exit status (torchrun does not report it when it was signalled)."""
        if code:
            log.error("rank %d exits with status %d", self.d.rank, code)
        elif self.d.is_main:
            log.info("rank %d exits with status 0", self.d.rank)
        else:
            log.warning("rank %d exits with status 0", self.d.rank)
