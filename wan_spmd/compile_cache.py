"""The compile cache that survives restarts: what torch compiles, kept under `--compile-cache DIR`.

torch already caches what it compiles on disk: inductor's FX graph cache (the generated code of a
graph), the AOTAutograd cache (the graph after AOTAutograd, pointing at the former), the kernels'
C++/Triton code and binaries, and autotuning results. All of it goes under one folder,
`TORCHINDUCTOR_CACHE_DIR` (Triton's under `TRITON_CACHE_DIR`), which is /tmp/torchinductor_$USER
unless told otherwise, so a container that restarts compiles everything again. Here both point at
a folder of `--compile-cache` (a volume in the Kubernetes manifests), one subfolder per key:

    DIR/<16 hex digits>/key.json     what went into the key (torch, CUDA, Triton, Python, GPU model,
                        inductor/    layout, model family, dtype, attention backend, quant mode,
                        triton/      compile backend)

so a cache made by another torch or Triton, another GPU model, layout, family, dtype, attention
backend or quant mode is never read: it is rebuilt beside the old one. torch's own cache keys
would already refuse a graph compiled for something else; the subfolder keeps unrelated entries
apart and makes the key visible.

Sharing: every rank of a replica and every replica may use the same DIR. torch writes each entry
atomically (a temporary file renamed into place) and takes a file lock per kernel while it builds
one, so concurrent writers of the same entry leave one whole copy, never a torn one.

Chosen over torch's "mega-cache" (`torch.compiler.save_cache_artifacts` /
`load_cache_artifacts`): the mega-cache packs the same entries into one blob that the program must
save after warm-up and load before compiling; with a persistent folder it only duplicates them, and
one blob per key written by many ranks and replicas is last-writer-wins. It is the tool for moving
a cache where no shared folder exists; the folder is simpler where one does.

A corrupt or unreadable entry: torch itself reads a corrupt FX graph or AOTAutograd entry as a miss
(and warns); a corrupt kernel file makes its compile raise. `CachedBackend` catches that, warns,
and compiles the graph again into a private temporary folder with the caches off, so a bad cache
costs a recompile, never the start-up. The compile happens before the graph runs, on one rank
alone, so the ranks' collectives stay in step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("wan_spmd")

KEY_FORMAT = 1
"""Bumped when what a cache folder holds changes meaning (a new ingredient, another layout)."""


def default_compile_cache() -> Path:
    """The user's cache folder: $XDG_CACHE_HOME/wan_spmd/compile (~/.cache/wan_spmd/compile)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wan_spmd" / "compile"


def parse_compile_cache(text: str | None) -> Path | None:
    """`--compile-cache DIR`, `none` (no cache), or None (the default folder). Torch-free, so a file
    where a folder should be stops every rank with one line before torch loads."""
    if text is None:
        return default_compile_cache()
    if text.strip().lower() == "none":
        return None
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--compile-cache {text}: a file, not a folder")
    return path


def package_version(name: str) -> str | None:
    """An installed distribution's version without importing it (importing Triton takes seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cache_key(
    *,
    device: str,
    layout: str,
    family: str,
    dtype: str,
    attention: str,
    quant: str,
    backend: str,
    torch_version: str,
    cuda: str | None,
    triton: str | None,
) -> dict[str, Any]:
    """What a compiled graph depends on outside its own code: the key's ingredients, in words."""
    return {
        "format": KEY_FORMAT,
        "torch": torch_version,
        "cuda": cuda,
        "triton": triton,
        "python": platform.python_version(),
        "device": device,
        "layout": layout,
        "family": family,
        "dtype": dtype,
        "attention": attention,
        "quant": quant,
        "backend": backend,
    }


def key_digest(key: dict[str, Any]) -> str:
    """The subfolder's name: 16 hex digits of the key's SHA-256."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def runtime_key(device, layout: str, family: str, dtype, attention: str, quant: str, backend: str) -> dict[str, Any]:
    """`cache_key` for this process: torch's, CUDA's and Triton's versions, and the GPU's model and
    compute capability (`cpu` off CUDA)."""
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        device_name = f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    else:
        device_name = device.type
    return cache_key(
        device=device_name,
        layout=layout,
        family=family,
        dtype=str(dtype).removeprefix("torch."),
        attention=attention,
        quant=quant,
        backend=backend,
        torch_version=torch.__version__,
        cuda=torch.version.cuda,
        triton=package_version("triton") or package_version("pytorch-triton"),
    )


def _write_key(folder: Path, key: dict[str, Any]) -> None:
    """key.json beside the entries, written atomically (ranks and replicas may race to write it)."""
    path = folder / "key.json"
    text = json.dumps(key, indent=1, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".key-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class CompileCache:
    """Where this process's compiles are cached (or that they are not), and what they cost."""

    folder: Path | None
    """DIR/<digest>, or None: no persistent cache (`none`, or a folder that could not be used)."""
    key: dict[str, Any] = field(default_factory=dict)
    fell_back: str | None = None
    """Why the cache was given up on mid-run (a corrupt entry), if it was."""
    graphs: int = 0
    """Graphs handed to the backend."""
    compile_s: float = 0.0
    """Seconds inside the backend (inductor's codegen and C++/Triton builds, or cache loads)."""

    def describe(self) -> str:
        if self.folder is None:
            return "no compile cache"
        return f"compile cache {self.folder}" + (f" (given up: {self.fell_back})" if self.fell_back else "")


def _point_torch_at(folder: Path | None) -> None:
    """Send inductor's and Triton's caches to `folder` (None: torch's caches off)."""
    import torch
    import torch._functorch.config
    import torch._inductor.config

    if folder is None:
        torch.compiler.config.force_disable_caches = True
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    # on by default in torch 2.11 and 2.13; set in case an environment variable turned them off
    torch.compiler.config.force_disable_caches = False
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True
    torch._functorch.config.enable_autograd_cache = True


def open_compile_cache(root: Path | None, key: dict[str, Any]) -> CompileCache:
    """Point torch's caches at root/<digest> before anything compiles. A folder that cannot be made
    or written is a warning and a run without the cache, never a failed start-up."""
    if root is None:
        _point_torch_at(None)
        return CompileCache(None, key)
    folder = root / key_digest(key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_key(folder, key)
    except OSError as exc:
        log.warning("compile cache %s cannot be used (%s); compiling without it", root, exc.strerror or exc)
        _point_torch_at(None)
        return CompileCache(None, key)
    _point_torch_at(folder)
    return CompileCache(folder, key)


def cache_hits() -> int:
    """Graphs found in torch's caches so far in this process. An AOTAutograd hit loads its (one,
    inference) FX graph from inductor's cache and counts there too; a miss there may still find the
    FX graph: so the larger of the two counts."""
    from torch._dynamo.utils import counters

    return int(max(counters["aot_autograd"]["autograd_cache_hit"], counters["inductor"]["fxgraph_cache_hit"]))


class CachedBackend:
    """The torch.compile backend (inductor, or aot_eager in CPU tests) behind a guard for the cache:
    a compile that raises while the cache is in use is warned about and done again with the caches
    off, in a private temporary folder (a corrupt kernel file in the shared one would otherwise be
    read again). Also counts the graphs and the seconds spent compiling them."""

    def __init__(self, name: str, cache: CompileCache) -> None:
        self.name = name
        self.cache = cache

    def __call__(self, gm, example_inputs) -> Callable[..., Any]:
        from torch._dynamo import lookup_backend

        start = time.perf_counter()
        self.cache.graphs += 1
        try:
            if self.cache.folder is None or self.cache.fell_back:
                return lookup_backend(self.name)(gm, example_inputs)
            try:
                return lookup_backend(self.name)(gm, example_inputs)
            except Exception as exc:  # a corrupt entry; anything else fails again below
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
                log.warning(
                    "compile cache %s could not be read (%s); compiling again without it (delete the folder "
                    "to rebuild it)",
                    self.cache.folder,
                    reason,
                )
                self.cache.fell_back = reason
                _point_torch_at(Path(tempfile.mkdtemp(prefix="wan_spmd-compile-")))
                import torch

                torch.compiler.config.force_disable_caches = True
                try:
                    from torch._inductor.utils import clear_caches
                except ImportError:  # not in every torch; the retry may then read a copy already loaded
                    pass
                else:
                    clear_caches()  # the in-memory copies of what was read from the bad folder
                return lookup_backend(self.name)(gm, example_inputs)
        finally:
            self.cache.compile_s += time.perf_counter() - start
