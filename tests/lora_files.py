"""LoRA files in the formats people download, for the tiny models' shapes (dim 48, FFN 64, 2
blocks, text_dim 32): written with safetensors as the tools that make them do."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DIM, FFN, BLOCKS = 48, 64, 2
# Wan's names -> (diffusers' name, (out, in)) for the linear layers a LoRA usually touches
_ATTN = tuple(zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True))
WAN_LINEARS = {
    **{f"self_attn.{o}": (f"attn1.{d}", (DIM, DIM)) for o, d in _ATTN},
    **{f"cross_attn.{o}": (f"attn2.{d}", (DIM, DIM)) for o, d in _ATTN},
    "ffn.0": ("ffn.net.0.proj", (FFN, DIM)),
    "ffn.2": ("ffn.net.2", (DIM, FFN)),
}


def _rand(gen: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def write_peft(path: Path, seed: int, rank: int = 4, bias: bool = True, alpha: float | None = None) -> Path:
    """diffusers / PEFT keys (`transformer.blocks.N.attn1.to_q.lora_A.weight`, `lora_B.bias`); with
    `alpha`, diffusers' `lora_adapter_metadata` carries lora_alpha and r."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(BLOCKS):
        for name, (out, inp) in WAN_LINEARS.values():
            prefix = f"transformer.blocks.{i}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = _rand(gen, rank, inp)
            tensors[f"{prefix}.lora_B.weight"] = _rand(gen, out, rank)
            if bias:
                tensors[f"{prefix}.lora_B.bias"] = _rand(gen, out)
    tensors["transformer.proj_out.lora_A.weight"] = _rand(gen, rank, DIM)
    tensors["transformer.proj_out.lora_B.weight"] = _rand(gen, 64, rank)
    metadata = None
    if alpha is not None:
        # what diffusers' save_lora_weights writes: the LoraConfig it is rebuilt from
        modules = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors})
        config = {"r": rank, "lora_alpha": alpha, "lora_bias": bias, "target_modules": modules}
        metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(tensors, path, metadata=metadata)
    return path


def write_wan(
    path: Path,
    seed: int,
    rank: int = 4,
    alpha: float = 2.0,
    head_alpha: bool = False,
    diffs: bool = False,
    image_branch: bool = False,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Original Wan / ComfyUI / lightx2v keys: `diffusion_model.blocks.N.self_attn.q.lora_down.weight`,
    `lora_up`, `.alpha`, `.diff_b` on the linears, pairs on head.head and time_projection (their
    `.alpha` only with `head_alpha`, which diffusers refuses); with `diffs` also the keys diffusers drops (norm
    `.diff`/`.diff_b`, `.diff_m`, a full `.diff` of a linear weight); with `image_branch` Wan2.1
    I2V's `k_img`/`v_img`/`norm_k_img`/`img_emb` keys."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.Generator().manual_seed(seed + 1000)  # its own draws: the other keys stay the same
    t: dict[str, torch.Tensor] = {}
    for i in range(BLOCKS):
        for wan, (_, (out, inp)) in WAN_LINEARS.items():
            prefix = f"diffusion_model.blocks.{i}.{wan}"
            t[f"{prefix}.lora_down.weight"] = _rand(gen, rank, inp)
            t[f"{prefix}.lora_up.weight"] = _rand(gen, out, rank)
            t[f"{prefix}.alpha"] = torch.tensor(alpha)
            t[f"{prefix}.diff_b"] = _rand(gen, out)
        if diffs:
            b = f"diffusion_model.blocks.{i}"
            t[f"{b}.norm3.diff"] = _rand(gen, DIM)
            t[f"{b}.norm3.diff_b"] = _rand(gen, DIM)
            t[f"{b}.self_attn.norm_q.diff"] = _rand(gen, DIM)
            t[f"{b}.cross_attn.norm_k.diff"] = _rand(gen, DIM)
            t[f"{b}.diff_m"] = _rand(gen, 1, 6, DIM, std=0.02)
            t[f"{b}.ffn.2.diff"] = _rand(gen, DIM, FFN, std=0.02)
        if image_branch:
            b = f"diffusion_model.blocks.{i}.cross_attn"
            for o in ("k_img", "v_img"):
                t[f"{b}.{o}.lora_down.weight"] = _rand(img, rank, DIM)
                t[f"{b}.{o}.lora_up.weight"] = _rand(img, DIM, rank)
                t[f"{b}.{o}.alpha"] = torch.tensor(alpha)
            t[f"{b}.norm_k_img.diff"] = _rand(img, DIM)
    # outside the blocks: the head (proj_out) and the time projection
    t["diffusion_model.head.head.lora_down.weight"] = _rand(gen, rank, DIM)
    t["diffusion_model.head.head.lora_up.weight"] = _rand(gen, 64, rank)
    t["diffusion_model.time_projection.1.lora_down.weight"] = _rand(gen, rank, DIM)
    t["diffusion_model.time_projection.1.lora_up.weight"] = _rand(gen, 6 * DIM, rank)
    if head_alpha:  # diffusers' converter refuses these two
        t["diffusion_model.head.head.alpha"] = torch.tensor(alpha)
        t["diffusion_model.time_projection.1.alpha"] = torch.tensor(alpha)
    if diffs:
        t["diffusion_model.head.diff_m"] = _rand(gen, 1, 2, DIM, std=0.02)
    if image_branch:
        t["diffusion_model.img_emb.proj.1.lora_down.weight"] = _rand(img, rank, DIM)
        t["diffusion_model.img_emb.proj.1.lora_up.weight"] = _rand(img, DIM, rank)
    t.update(extra or {})
    save_file({k: v.contiguous() for k, v in t.items()}, path)
    return path


def hand_merge(state: dict[str, torch.Tensor], path: Path, scale: float) -> dict[str, torch.Tensor]:
    """The textbook merge of a Wan-format file, written apart from wan_spmd.lora: W += scale * alpha
    / rank * up @ down, b += scale * diff_b, w += scale * diff, modulation += scale * diff_m."""
    from safetensors.torch import load_file

    lora = load_file(path)
    names = {wan: d for wan, (d, _) in WAN_LINEARS.items()}
    names |= {"self_attn.norm_q": "attn1.norm_q", "cross_attn.norm_k": "attn2.norm_k", "norm3": "norm2"}
    top = {"head.head": "proj_out", "time_projection.1": "condition_embedder.time_proj"}

    def target(module: str) -> str:
        if module in top:
            return top[module]
        _, i, rest = module.split(".", 2)
        return f"blocks.{i}.{names[rest]}"

    out = {k: v.clone().float() for k, v in state.items()}
    for key, value in lora.items():
        key = key.removeprefix("diffusion_model.")
        if key.endswith(".lora_down.weight"):
            module = key.removesuffix(".lora_down.weight")
            up = lora[f"diffusion_model.{module}.lora_up.weight"]
            alpha = float(lora.get(f"diffusion_model.{module}.alpha", value.shape[0]))
            out[f"{target(module)}.weight"] += scale * alpha / value.shape[0] * (up @ value)
        elif key.endswith(".diff_b"):
            out[f"{target(key.removesuffix('.diff_b'))}.bias"] += scale * value
        elif key.endswith(".diff_m"):
            module = key.removesuffix(".diff_m")
            out["scale_shift_table" if module == "head" else f"{module}.scale_shift_table"] += scale * value
        elif key.endswith(".diff"):
            out[f"{target(key.removesuffix('.diff'))}.weight"] += scale * value
    return out
