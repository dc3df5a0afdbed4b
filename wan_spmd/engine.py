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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from wan_spmd.compile_cache import CompileCache, default_compile_cache
from wan_spmd.config import ModelInfo
from wan_spmd.jobs import Job, JobSource
from wan_spmd.launch import CacheSpec, LoraSpec, ParallelLayout, WarmupShape
from wan_spmd.memory import Plan
from wan_spmd.options import default
from wan_spmd.process import process_age_s

if TYPE_CHECKING:  # torch: imported when the engine runs, so a server listens before it loads
    from wan_spmd.attention import AttentionFn
    from wan_spmd.pipeline import WanVideoPipeline
    from wan_spmd.runtime import Dist, JobReport, ShutdownWatch

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
    """(width, height, frames) whose transformer forwards (`warmup`) run before the ranks agree they are ready;
    None: `auto_warmup_shapes` when the blocks are compiled, none otherwise."""
    auto_warmup_shapes: tuple[WarmupShape, ...] = ()
    """The command's own choice: serve the preset's shape, generate its job's (batch's come from its
    front on rank 0, `Front.warmup_shapes`)."""
    vae_dtype: str = default("vae_dtype")
    loras: tuple[LoraSpec, ...] = ()
    """LoRA files fused into the experts' slices at load, before compile and warm-up."""
    memory_plan: Plan | None = None
    """Where the weights live (memory.plan_for, decided before loading for --gpu-memory); None:
    everything resident (the CPU without a budget)."""
    attention: str = default("attention")
    """auto|sdpa|fa3|fa3-fp8 (`kernels.select_attention`): auto is FA3 bf16 where it runs (Hopper)."""
    quant: str = default("quant")
    """none|fp8: fp8 rowwise linears in the experts' blocks (torchao), after LoRA fusion and TP slicing."""
    compile_cache: Path | None = field(default_factory=default_compile_cache)
    """--compile-cache: the folder torch's compile caches persist in, one subfolder per key
    (`compile_cache`); None: torch's caches off."""
    prompt_cache: int = default("prompt_cache")
    """Prompt embeddings kept across requests (`caches`); 0: none."""
    condition_cache: int = default("condition_cache")
    """I2V condition latents kept across requests (`caches`); 0: none."""
    vae_encode_reuse: bool = default("vae_encode_reuse")
    """The I2V condition's encode reuses a stage's output where its input and cache repeat (exact;
    `vae_reuse`); False: diffusers' encode as it is."""
    cache: CacheSpec = CacheSpec()
    """--cache-backend/--cache-config: the step cache installed on the experts after compile."""

    @property
    def heartbeat_s(self) -> float:
        """Idle heartbeat period, well inside the timeout that bounds the other ranks' wait."""
        return min(5.0, self.heartbeat_timeout_s / 4)


class Front(Protocol):
    """A command's rank-0 side: where jobs come from and how the command ends."""

    source: JobSource

    def start(self) -> None:
        """Before loading (serve listens here, so /health says 503 while loading); ValueError to fail.
        The CLI calls it once before torch is imported and the engine once more: the second call
        raises the first one's error again, or does nothing."""

    def ready(self, world_size: int, startup: Startup) -> None:
        """Every rank has loaded and warmed up; `startup` says where the time went."""

    def on_signal(self, name: str) -> None:
        """SIGTERM/SIGINT arrived (shutdown watch's thread): stop admitting; the source's
        `request_stop` cancels the running job at its next step."""

    def stopped(self, lost: bool) -> None:
        """The loop ended (or never started): answer whatever still waits."""

    def on_expire(self, signal_name: str | None) -> None:
        """The main thread is stuck past the grace period; the process ends right after this."""

    def exit_code(self, jobs: int, signal_name: str | None) -> int:
        """The command's exit status after a clean stop (e.g. 1 if a job failed or was interrupted)."""

    def warmup_shapes(self) -> tuple[WarmupShape, ...]:
        """Shapes of the front's own work to warm up with when compiled (batch: its file's first two),
        found on rank 0 alone (it may decode request images) and broadcast to the others."""


@dataclass
class Startup:
    """Where rank 0's start-up went, for the ready line."""

    before_load_s: float = 0.0
    """Process start to loading: imports, the process group, the front."""
    load_s: float = 0.0
    """Weights read (or made), parallelized, quantized."""
    warmup_s: float = 0.0
    compile_s: float = 0.0
    """Of warmup_s: dynamo's tracing and the backend's compiles (or loads from the cache)."""
    graphs: int = 0
    cache_hits: int = 0
    cache: CompileCache | None = None

    def describe(self) -> str:
        """imports 4.1 s, load 2.3 s, compile 12.0 s (4 graphs, 4 from the cache), warm-up compute 3.1 s"""
        parts = [f"imports {self.before_load_s:.1f} s", f"load {self.load_s:.1f} s"]
        if self.cache is not None:
            cached = "no cache" if self.cache.folder is None else f"{self.cache_hits} from the cache"
            parts.append(f"compile {self.compile_s:.1f} s ({self.graphs} graph(s), {cached})")
            parts.append(f"warm-up compute {max(self.warmup_s - self.compile_s, 0.0):.1f} s")
        elif self.warmup_s:
            parts.append(f"warm-up {self.warmup_s:.1f} s")
        return ", ".join(parts)


Fault = Callable[[str, Job, int], None]
"""A test seam: called as fault(stage, job, rank) with stage "start", "step N" before each step's
agreement, and "deliver" (rank 0); raising there injects a failure into the real runner."""


class JobRunner:
    """One job on this rank: denoise with the agreed step control, decode (split over the ranks
    where the pipeline's VAE is), and on rank 0 stream the frames into the mp4 at the path the
    front chose."""

    def __init__(self, pipe: WanVideoPipeline, rank: int, fault: Fault | None = None) -> None:
        self.pipe = pipe
        self.rank = rank
        self.fault = fault
        self.current: Job | None = None
        """The job in hand (read by the shutdown watch's thread to say what a signal stops)."""

    def __call__(
        self, job: Job, control: Callable[..., bool], on_step: Callable[[int, int], None], output: Path | None
    ) -> JobReport:
        self.current = job
        try:
            return self._run(job, control, on_step, output)
        finally:
            self.current = None

    def _run(
        self, job: Job, control: Callable[..., bool], on_step: Callable[[int, int], None], output: Path | None
    ) -> JobReport:
        from wan_spmd.compiling import compiled_graphs
        from wan_spmd.deliver import deliver
        from wan_spmd.pipeline import JobCancelled
        from wan_spmd.placement import reset_peak_memory
        from wan_spmd.runtime import JobAgreement, JobReport

        fault, rank = self.fault, self.rank
        graphs_before = compiled_graphs()
        reset_peak_memory(self.pipe.device)  # this job's peak, not the warm-up's or the last job's
        # the step cache's decisions are agreed on the job's control-plane group, beside its steps
        cache_agree = control.agree_compute if isinstance(control, JobAgreement) else None
        if fault is not None:
            fault("start", job, rank)
            agreed = control

            def control(step: int, total: int, stage: str = "step") -> bool:
                fault(f"{stage} {step}", job, rank)
                return agreed(step, total, stage)

        state = self.pipe.generate_latents(job.params, control=control, on_step=on_step, cache_agree=cache_agree)
        if new_graphs := compiled_graphs() - graphs_before:
            # warm-up did not cover this shape (or the recompile limit was reached): say so
            log.warning("job %s paid for compiling %d new graph(s) (%s)", job.id, new_graphs, job.params.size)
            state.timer.ms["NewCompiledGraphs"] = float(new_graphs)
        # the stop is checked between decoded chunks too (agreed as the steps are): a deadline,
        # DELETE or SIGTERM lands within one chunk, not after the whole decode
        chunks = self.pipe.timed_decode(state, control=control)
        if output is None:  # not rank 0: take part in the decoder's collectives, keep nothing
            for _ in chunks:
                pass
            return JobReport(timings_ms=state.timer.ms, peak_memory=self._peak())
        try:
            if fault is not None:
                fault("deliver", job, rank)
            frames_dir = Path(job.frames_dir) if job.frames_dir else None
            path, writer_ms = deliver(chunks, output, job.params, frames_dir)
        except JobCancelled:  # the agreed stop: every rank left the decode at the same chunk
            raise
        except Exception as exc:
            # a parallel decoder's other ranks are inside its collectives until the last chunk:
            # finish the decode with them (a stop agreed meanwhile ends it early), then report
            log.warning("job %s: writing the video failed (%s: %s)", job.id, type(exc).__name__, exc)
            for _ in chunks:
                pass
            raise
        return JobReport(path, {**state.timer.ms, **writer_ms}, peak_memory=self._peak())

    def _peak(self):
        from wan_spmd.placement import peak_memory

        return peak_memory(self.pipe.device)


def build_pipeline(
    d: Dist, info: ModelInfo, options: EngineOptions, attend: AttentionFn | None = None, startup: Startup | None = None
) -> WanVideoPipeline:
    """Load this rank's part of the model and parallelize it as the layout says; every attention in
    the experts goes through `attend` (a kernel backend of `AttentionFn`'s signature; None: the
    one `--attention` selects). `startup` gets the load's seconds and the compile cache."""
    import functools

    import torch

    from wan_spmd.caches import LruCache
    from wan_spmd.compile_cache import CachedBackend, open_compile_cache, runtime_key
    from wan_spmd.compiling import compile_blocks, resolve_compile
    from wan_spmd.kernels import BACKENDS, quantize_fp8, select_attention
    from wan_spmd.models import Dtypes, load_components
    from wan_spmd.parallel import CfgParallel, build_mesh, parallelize
    from wan_spmd.parallel.vae import split_vae
    from wan_spmd.pipeline import WanVideoPipeline, serial_cfg
    from wan_spmd.placement import make_placement
    from wan_spmd.tiny import quiet_hub_logging
    from wan_spmd.vae_reuse import reuse_encode_mode

    quiet_hub_logging()
    start = time.perf_counter()
    if startup is not None:  # the imports above (diffusers, transformers) count as imports
        startup.before_load_s = process_age_s()
    layout = options.layout
    mesh = build_mesh(layout, d.device)
    dtypes = Dtypes.for_device(d.device, vae=options.vae_dtype)
    components = load_components(
        info, d.device, dtypes, mesh=mesh.tp_mesh, load_format=options.load_format, loras=options.loras
    )
    compiled = resolve_compile(options.compile, d.device)
    kernel_line = "attention: given by the caller"
    if attend is None:
        attend, kernel_line = select_attention(options.attention, d.device)
    backend: CachedBackend | str = options.compile_backend
    if compiled:  # before the first compile: torch's caches under --compile-cache, keyed
        attention = next((name for name, fn in BACKENDS.items() if fn is attend), getattr(attend, "__name__", "?"))
        key = runtime_key(
            d.device, layout.describe(), info.family.name, dtypes.transformer, attention, options.quant, backend
        )
        backend = CachedBackend(options.compile_backend, open_compile_cache(options.compile_cache, key))
        if startup is not None:
            startup.cache = backend.cache
    experts, quant_lines = [], []
    for expert in components.experts:
        experts.append(parallelize(expert, mesh, attend, per_token_timesteps=info.family.expand_timesteps))
        if options.quant == "fp8":
            # after LoRA fusion (load) and TP's slicing (parallelize), before compile
            quant_lines.append(quantize_fp8(expert).summary())
        if compiled:
            compile_blocks(experts[-1], backend)
    if startup is not None:
        startup.load_s = time.perf_counter() - start
    log.info(
        "loaded %s on %d rank(s) (%s%s) in %.1f s%s; %s; quant %s",
        info.path or info.config_name,
        d.world_size,
        layout.describe(),
        f", blocks compiled ({backend.cache.describe()})" if compiled else "",
        time.perf_counter() - start,
        "".join(f"; fused LoRA {spec.describe()}" for spec in options.loras),
        kernel_line,
        options.quant + "".join(f" (expert {i + 1}: {line})" for i, line in enumerate(quant_lines)),
    )
    plan = options.memory_plan
    # the VAE is whole on every rank: encode and decode split its rows over the world
    vae_split = split_vae(components.vae, d.world_size, d.rank)
    pipe = WanVideoPipeline(
        components,
        info,
        d.device,
        predict_noise=CfgParallel(mesh.mesh) if layout.cfg > 1 else serial_cfg,
        cfg_branch=mesh.cfg_branch,
        experts=experts,
        vae_split=vae_split,
        is_main=d.is_main,
        placement=make_placement(components, d.device, plan.placement) if plan is not None else None,
    )
    if options.vae_encode_reuse:  # the I2V condition's encode, split or not
        if vae_split is not None:
            vae_split.band_encoder = functools.partial(reuse_encode_mode, agree=vae_split.all_true)
        else:
            pipe.condition_encoder = reuse_encode_mode
    # across requests; a row-split encode is collective, so there every rank agrees on each lookup
    agree = None
    if vae_split is not None:
        agree = lambda hit: vae_split.all_true(torch.tensor(hit, device=d.device))  # noqa: E731
    pipe.prompt_cache = LruCache("prompt", options.prompt_cache) if options.prompt_cache else None
    pipe.condition_cache = LruCache("condition", options.condition_cache, agree) if options.condition_cache else None
    if options.cache.enabled:  # after parallelize and compile: the compiled blocks stay as they are
        from wan_spmd.step_cache import StepCache

        pipe.step_cache = StepCache(options.cache, info.family.name, info.family.expert_names)
        pipe.step_cache.install(pipe.experts)
        log.info("step cache: %s", options.cache.describe())
    return pipe


def measure_warm_up(pipe: WanVideoPipeline, shapes: tuple[WarmupShape, ...], startup: Startup) -> None:
    """`warmup.warm_up`, with its compiles counted: graphs, cache hits, and dynamo's seconds."""
    from torch._dynamo.utils import compilation_time_metrics

    from wan_spmd.compile_cache import cache_hits
    from wan_spmd.compiling import compiled_graphs
    from wan_spmd.warmup import warm_up

    def dynamo_s() -> float:
        return sum(compilation_time_metrics.get("_compile.compile_inner", ()))

    graphs, hits, compile_s = compiled_graphs(), cache_hits(), dynamo_s()
    startup.warmup_s = warm_up(pipe, shapes)
    startup.graphs = compiled_graphs() - graphs
    startup.cache_hits = cache_hits() - hits
    startup.compile_s = dynamo_s() - compile_s


def report_resident(d: Dist, pipe: WanVideoPipeline, plan: Plan | None) -> None:
    """At ready, rank 0 logs the memory plan and every rank's resident weights by component
    (gathered on the control plane: other ranks log at WARNING only)."""
    import os

    from wan_spmd.placement import describe_resident, resident_weights
    from wan_spmd.runtime import ControlPlane

    every = ControlPlane(d).gather_objects(resident_weights(pipe.c), "gathering resident weights")
    if d.is_main:
        if plan is not None:
            log.info("%s", plan.describe(int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))))
        for rank, weights in enumerate(every):
            log.info("resident weights %s", describe_resident(rank, weights))


def agree_all_ok(d: Dist, ok: bool) -> bool:
    """One control-plane all-reduce after start-up: it returns only once every rank got here, and
    says whether every rank is ready (loaded, and on rank 0 its front started)."""
    from wan_spmd.runtime import ControlPlane

    failed, _ = ControlPlane(d).any_flags(not ok, False)
    return not failed


def run_engine(info: ModelInfo, options: EngineOptions, front: Front | None, fault: Fault | None = None) -> int:
    """Every rank of every command: the whole lifecycle; returns the exit status.

    `front` is rank 0's (None elsewhere). 0 after a clean stop unless the front says otherwise,
    1 when a rank was lost or could not start.
    """
    from wan_spmd.runtime import ShutdownWatch, init_dist

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
        self.runner: JobRunner | None = None

    def run(self, watch: ShutdownWatch) -> int:
        from wan_spmd.compiling import resolve_compile
        from wan_spmd.runtime import ControlPlane, ControlPlaneLost, shutdown, spmd_loop, wait_for_all

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
            startup = Startup()
            if ok:
                try:
                    pipe = build_pipeline(d, self.info, self.options, startup=startup)
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
            shapes = self.options.warmup_shapes
            if shapes is None and resolve_compile(self.options.compile, d.device):
                # rank 0's front adds its own (every rank joins the broadcast)
                mine = self.front.warmup_shapes() if self.front is not None else None
                theirs = ControlPlane(d).broadcast(mine, "the warm-up shapes")
                shapes = tuple(dict.fromkeys((*self.options.auto_warmup_shapes, *theirs)))
            shapes = shapes or ()
            if shapes:
                try:
                    measure_warm_up(pipe, shapes, startup)
                except Exception:
                    log.exception("rank %d could not warm up", d.rank)
                    ok = False
                wait_for_all(d, self.options.load_timeout_s)
                if not agree_all_ok(d, ok):
                    if d.is_main:
                        log.error("not every rank warmed up; stopping")
                    return 1
            report_resident(d, pipe, self.options.memory_plan)
            if self.front is not None:
                self.front.ready(d.world_size, startup)
            runner = self.runner = JobRunner(pipe, d.rank, self.fault)
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
        running = self.runner.current if self.runner is not None else None
        if running is not None:
            log.info("%s: stopping job %s at its next step or decoded chunk", name, running.id)
        else:
            log.info("%s: stopping (no job running)", name)
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
