"""A Wan2.2 pipeline's components, from a local diffusers-format folder or as dummy weights.

The experts are read by `loading` (each rank only its slices); the text encoder and VAE whole.
How many experts there are is the family's fact (`families`), never assumed here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import diffusers
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from wan_spmd.config import UMT5_XXL_ENCODER, ModelFolderError, ModelInfo
from wan_spmd.launch import LoraSpec
from wan_spmd.loading import dummy_expert_sharded, load_expert_sharded, random_weight
from wan_spmd.tiny import tiny_tokenizer

log = logging.getLogger("wan_spmd")


@dataclass
class Components:
    """The loaded parts of a Wan2.2 pipeline."""

    tokenizer: PreTrainedTokenizerBase
    text_encoder: UMT5EncoderModel
    vae: AutoencoderKLWan
    scheduler: UniPCMultistepScheduler
    experts: list[WanTransformer3DModel]
    """In the family's order: `transformer` (the high-noise expert where there are two, timesteps
    >= boundary), then `transformer_2` (low-noise)."""

    @property
    def transformer(self) -> WanTransformer3DModel:
        return self.experts[0]

    @property
    def transformer_2(self) -> WanTransformer3DModel | None:
        return self.experts[1] if len(self.experts) > 1 else None


@dataclass(frozen=True)
class Dtypes:
    """Where precision matters: bf16 experts and text encoder on GPUs, fp32 VAE (as diffusers advises)."""

    transformer: torch.dtype = torch.float32
    text_encoder: torch.dtype = torch.float32
    vae: torch.dtype = torch.float32

    @classmethod
    def for_device(cls, device: torch.device, vae: str = "fp32") -> Dtypes:
        """`vae` is --vae-dtype: fp32 by default; bf16 halves the VAE's time and working memory
        (docs/benchmarks.md) at a small numeric cost."""
        vae_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[vae]
        if device.type == "cuda":
            return cls(transformer=torch.bfloat16, text_encoder=torch.bfloat16, vae=vae_dtype)
        return cls(vae=vae_dtype)


def scheduler_from_folder(info: ModelInfo):
    """The scheduler class named in scheduler_config.json (UniPC for Wan2.2)."""
    cfg = json.loads((info.path / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, cfg.get("_class_name", "UniPCMultistepScheduler"), None)
    if cls is None:
        raise ModelFolderError(f"unknown scheduler class {cfg.get('_class_name')!r} in {info.path}/scheduler")
    return cls.from_pretrained(info.path / "scheduler")


def load_text_and_vae(info: ModelInfo, device: torch.device, dtypes: Dtypes):
    """Tokenizer, text encoder and VAE, placed on `device`."""
    tokenizer = AutoTokenizer.from_pretrained(info.path / "tokenizer")
    text_encoder = UMT5EncoderModel.from_pretrained(info.path / "text_encoder", dtype=dtypes.text_encoder)
    vae = AutoencoderKLWan.from_pretrained(info.path / "vae", torch_dtype=dtypes.vae)
    return tokenizer, text_encoder.to(device).eval(), vae.to(device).eval()


def load_components(
    info: ModelInfo,
    device: torch.device,
    dtypes: Dtypes | None = None,
    mesh=None,
    load_format: str = "auto",
    loras: tuple[LoraSpec, ...] = (),
) -> Components:
    """Every component of a Wan2.2 model on `device`; with a TP `mesh` (the tensor-parallel
    sub-mesh, not the world), each rank reads only its slices of the experts, `loras` fused into
    them as they are read. `load_format="dummy"` builds the architecture with random weights."""
    names = info.family.expert_names
    dtypes = dtypes or Dtypes.for_device(device)
    deltas: dict = {}
    if loras:
        from wan_spmd.lora import read_deltas

        deltas, _ = read_deltas(loras, names, info.transformer_config)
    if load_format == "dummy":
        tokenizer, text_encoder, vae, scheduler = _dummy_text_and_vae(device, dtypes, info.vae_config)
        experts = [
            dummy_expert_sharded(info.transformer_config, mesh, device, dtypes.transformer, i, deltas.pop(name, None))
            for i, name in enumerate(names, start=1)
        ]
    else:
        tokenizer, text_encoder, vae = load_text_and_vae(info, device, dtypes)
        scheduler = scheduler_from_folder(info)
        experts = [
            load_expert_sharded(info.path / name, mesh, device, dtypes.transformer, deltas.pop(name, None))
            for name in names
        ]
    return Components(tokenizer, text_encoder, vae, scheduler, experts)


def _dummy_text_and_vae(device: torch.device, dtypes: Dtypes, vae_config: dict):
    """Real-size text encoder and VAE (the family's: `vae_config` holds the arguments that differ from
    the Wan2.1 VAE's defaults) with random weights, made on the device (benchmarks).

    The tokenizer is the tiny one: the encoder always runs all 512 positions, so the cost is real.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL_ENCODER))
    for name, meta in list(text_encoder.named_parameters()):
        owner, _, attr = name.rpartition(".")
        value = random_weight(name, meta.shape, device, dtypes.text_encoder, seed=3)
        setattr(text_encoder.get_submodule(owner), attr, torch.nn.Parameter(value, requires_grad=False))
    torch.manual_seed(4)
    vae = AutoencoderKLWan(**vae_config).to(device=device, dtype=dtypes.vae)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )
    return tiny_tokenizer(), text_encoder.eval(), vae.eval(), scheduler
