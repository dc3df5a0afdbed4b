"""Host memory of sharded loading: each rank's peak RSS while it loads its half of an expert.

  python benchmarks/host_memory.py write DIR --layers 24 --dim 2048 --ffn 8192   # a random checkpoint
  torchrun --nproc-per-node 2 benchmarks/host_memory.py load DIR                   # rank 0 prints a JSON line per rank
  python benchmarks/host_memory.py write-lora DIR --rank 64                        # DIR/lora.safetensors
  torchrun --nproc-per-node 2 benchmarks/host_memory.py load DIR --lora DIR/lora.safetensors   # fused at load

The checkpoint is a Wan expert in diffusers' sharded layout (one safetensors file per block plus
the index), bf16, written one block at a time so writing it needs little memory either.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def expert_config(layers: int, dim: int, ffn: int) -> dict:
    """The A14B expert's architecture, scaled down to a checkpoint of a few GB."""
    from wan_spmd.config import REAL_MODELS

    real = REAL_MODELS["wan2.2-i2v-a14b"].transformer_config
    return {**real, "num_attention_heads": dim // 128, "ffn_dim": ffn, "num_layers": layers, "text_dim": 256}


def write_checkpoint(folder: Path, layers: int, dim: int, ffn: int) -> int:
    """Write the checkpoint; returns its size in bytes."""
    from safetensors.torch import save_file

    from wan_spmd.loading import expert_on_meta

    folder.mkdir(parents=True, exist_ok=True)
    config = expert_config(layers, dim, ffn)
    model = expert_on_meta(config)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, meta in model.named_parameters():
        key = name.split(".")[1] if name.startswith("blocks.") else "rest"
        groups.setdefault(key, {})[name] = meta
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for key, params in groups.items():
        file_name = f"diffusion_pytorch_model-{key}.safetensors"
        tensors = {n: (torch.randn(m.shape, generator=gen) * 0.02).to(torch.bfloat16) for n, m in params.items()}
        save_file(tensors, folder / file_name)
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({n: file_name for n in tensors})
        del tensors
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **config}))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return total


def write_lora(folder: Path, rank: int) -> int:
    """A Wan-format (lightx2v-style) LoRA for the checkpoint in `folder`: a rank-`rank` pair with
    alpha and a bias delta on every attention and FFN linear of every block; returns its bytes."""
    from safetensors.torch import save_file

    config = json.loads((folder / "config.json").read_text())
    dim, ffn = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    shapes = {f"{a}.{o}": (dim, dim) for a in ("self_attn", "cross_attn") for o in "qkvo"}
    shapes |= {"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(config["num_layers"]):
        for module, (out, inp) in shapes.items():
            key = f"diffusion_model.blocks.{i}.{module}"
            tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, inp, generator=gen) * 0.01).to(torch.bfloat16)
            tensors[f"{key}.lora_up.weight"] = (torch.randn(out, rank, generator=gen) * 0.01).to(torch.bfloat16)
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
            tensors[f"{key}.diff_b"] = torch.zeros(out, dtype=torch.bfloat16)
    save_file(tensors, folder / "lora.safetensors")
    return sum(t.numel() * t.element_size() for t in tensors.values())


def load(folder: Path, lora: Path | None = None) -> list[dict]:
    """Load this rank's shard under torchrun (gloo) and report memory: every rank's report on rank 0
    (empty elsewhere), so that one process prints them and lines of two ranks never interleave."""
    from torch.distributed.device_mesh import init_device_mesh

    from wan_spmd.loading import load_expert_sharded
    from wan_spmd.process import torchrun_env
    from wan_spmd.runtime import init_dist, shutdown

    rank, world_size, _ = torchrun_env()
    d = init_dist("cpu")
    mesh = init_device_mesh(d.device.type, (world_size,), mesh_dim_names=("tp",)) if world_size > 1 else None
    # the libraries the loader uses are imported before the baseline: their code is not the load's
    import accelerate  # noqa: F401
    from diffusers import WanTransformer3DModel  # noqa: F401

    before = rss_mib()
    deltas = None
    if lora is not None:  # read the LoRA (whole: it is small) and fuse it into each slice as it loads
        from wan_spmd.launch import parse_lora_spec
        from wan_spmd.lora import read_deltas

        config = json.loads((folder / "config.json").read_text())
        deltas = read_deltas((parse_lora_spec(str(lora)),), ("transformer",), config)[0]["transformer"]
    model = load_expert_sharded(folder, mesh, d.device, torch.bfloat16, deltas)
    del deltas
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    # On the CPU the slices may still be lazily mapped file pages: touch every byte, as a forward would.
    checksum = sum(float(t.float().sum()) for t in local)
    local_bytes = sum(t.numel() * t.element_size() for t in local)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    result = {
        "rank": rank,
        "world_size": world_size,
        "checkpoint_mib": index["metadata"]["total_size"] / 2**20,
        "lora_mib": lora.stat().st_size / 2**20 if lora is not None else 0.0,
        "local_weights_mib": local_bytes / 2**20,
        "rss_before_load_mib": before,
        "peak_rss_mib": peak_rss_mib(),
        "peak_growth_mib": peak_rss_mib() - before,
        "checksum": checksum,
    }
    reports = [result]
    if world_size > 1:
        import torch.distributed as dist

        reports = [None] * world_size
        dist.all_gather_object(reports, result)
    shutdown(d)
    return reports if rank == 0 else []


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["write", "load", "write-lora"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=64, help="write-lora: the LoRA's rank")
    parser.add_argument("--lora", type=Path, default=None, help="load: fuse this LoRA at load")
    args = parser.parse_args()
    if args.action == "write":
        size = write_checkpoint(args.folder, args.layers, args.dim, args.ffn)
        print(json.dumps({"written_mib": size / 2**20}))
    elif args.action == "write-lora":
        print(json.dumps({"lora_mib": write_lora(args.folder, args.rank) / 2**20}))
    else:
        from wan_spmd.process import finish_process

        for report in load(args.folder, args.lora):
            print(json.dumps(report), flush=True)
        finish_process(0)
