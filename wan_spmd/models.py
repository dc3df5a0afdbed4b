"""Wan2.2 components from a local diffusers-format folder, and the tiny random checkpoint.

The tiny checkpoint is written in exactly the layout of Wan-AI/Wan2.2-I2V-A14B-Diffusers (and
T2V) and loaded through the same `load_components` as real weights, so tests exercise the real
loader. It makes noise, not art.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from wan_spmd.config import ModelFolderError, ModelInfo, tiny_cache_dir

log = logging.getLogger("wan_spmd")


@dataclass
class Components:
    """The loaded parts of a Wan2.2 two-expert pipeline."""

    tokenizer: PreTrainedTokenizerBase
    text_encoder: UMT5EncoderModel
    vae: AutoencoderKLWan
    scheduler: UniPCMultistepScheduler
    transformer: WanTransformer3DModel
    """High-noise expert (timesteps >= boundary)."""
    transformer_2: WanTransformer3DModel
    """Low-noise expert."""


@dataclass(frozen=True)
class Dtypes:
    """Where precision matters: bf16 experts and text encoder on GPUs, fp32 VAE (as diffusers advises)."""

    transformer: torch.dtype = torch.float32
    text_encoder: torch.dtype = torch.float32
    vae: torch.dtype = torch.float32

    @classmethod
    def for_device(cls, device: torch.device) -> Dtypes:
        if device.type == "cuda":
            return cls(transformer=torch.bfloat16, text_encoder=torch.bfloat16, vae=torch.float32)
        return cls()


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
) -> Components:
    """Every component of a Wan2.2 model on `device`; with a TP `mesh`, each rank reads only its
    slices of the experts. `load_format="dummy"` builds the architecture with random weights."""
    from wan_spmd.parallel import dummy_expert_sharded, load_expert_sharded

    dtypes = dtypes or Dtypes.for_device(device)
    if load_format == "dummy":
        tokenizer, text_encoder, vae, scheduler = _dummy_text_and_vae(device, dtypes)
        experts = [
            dummy_expert_sharded(info.transformer_config, mesh, device, dtypes.transformer, seed=i) for i in (1, 2)
        ]
    else:
        tokenizer, text_encoder, vae = load_text_and_vae(info, device, dtypes)
        scheduler = scheduler_from_folder(info)
        experts = [
            load_expert_sharded(info.path / name, mesh, device, dtypes.transformer)
            for name in ("transformer", "transformer_2")
        ]
    return Components(tokenizer, text_encoder, vae, scheduler, experts[0], experts[1])


def _dummy_text_and_vae(device: torch.device, dtypes: Dtypes):
    """Real-size text encoder and VAE with random weights, made on the device (benchmarks).

    The tokenizer is the tiny one: the encoder always runs all 512 positions, so the cost is real.
    """
    from accelerate import init_empty_weights

    from wan_spmd.config import UMT5_XXL_ENCODER
    from wan_spmd.parallel import random_weight

    with init_empty_weights(include_buffers=False):
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL_ENCODER))
    for name, meta in list(text_encoder.named_parameters()):
        owner, _, attr = name.rpartition(".")
        value = random_weight(name, meta.shape, device, dtypes.text_encoder, seed=3)
        setattr(text_encoder.get_submodule(owner), attr, torch.nn.Parameter(value, requires_grad=False))
    torch.manual_seed(4)
    vae = AutoencoderKLWan().to(device=device, dtype=dtypes.vae)  # the Wan2.1 VAE's default arguments
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )
    return _tiny_tokenizer(), text_encoder.eval(), vae.eval(), scheduler


# ---------------------------------------------------------------------------------------------
# The tiny checkpoint


def quiet_hub_logging() -> None:
    """diffusers/transformers progress bars and info chatter are noise in our output."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _tiny_tokenizer():
    """A small Unigram (sentencepiece-style) tokenizer built locally: no hub access.

    Special ids follow T5: <pad>=0, </s>=1, <unk>=2; every prompt ends with </s>.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -2.0) for c in chars] + [(c, -3.0) for c in chars] + [("\u2581", -4.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_transformer_config(in_channels: int) -> dict:
    """A 2-layer, 4-head Wan expert with every architectural switch of the real A14B one."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=12,  # rotary splits it into t/h/w parts: 4/4/4
        in_channels=in_channels,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=32,
    )


def make_tiny(dest: str | Path, variant: str = "i2v", seed: int = 0) -> Path:
    """Write a tiny random Wan2.2 checkpoint in the real diffusers folder layout."""
    if variant not in ("i2v", "t2v"):
        raise ValueError(f"variant must be i2v or t2v, got {variant!r}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    is_i2v = variant == "i2v"
    torch.manual_seed(seed)
    quiet_hub_logging()

    tokenizer = _tiny_tokenizer()
    tokenizer.save_pretrained(dest / "tokenizer")
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
        )
    )
    text_encoder.save_pretrained(dest / "text_encoder")
    # The real Wan VAE with a 3-channel base instead of 96 (z_dim stays 16: the experts need it).
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    vae.save_pretrained(dest / "vae")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=5.0 if is_i2v else 12.0,
    ).save_pretrained(dest / "scheduler")
    for name in ("transformer", "transformer_2"):
        WanTransformer3DModel(**tiny_transformer_config(36 if is_i2v else 16)).save_pretrained(dest / name)

    cls = "WanImageToVideoPipeline" if is_i2v else "WanPipeline"
    index = {
        "_class_name": cls,
        "_diffusers_version": diffusers.__version__,
        "boundary_ratio": 0.9 if is_i2v else 0.875,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if is_i2v:
        index.update(expand_timesteps=False, image_encoder=[None, None], image_processor=[None, None])
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    # Defaults small enough for 2 CPU cores; 4 steps put 2 on each expert at boundary 0.9/0.875.
    size_line = 'max_area = "64x64"' if is_i2v else 'size = "64x64"'
    (dest / "generation.toml").write_text(
        "# Written by `wan_spmd make-tiny`: a tiny random model, noise not art.\n"
        "[generation]\n"
        f"num_inference_steps = 4\nnum_frames = 9\nfps = 8\n{size_line}\n"
        f'flow_shift = {5.0 if is_i2v else 12.0}\nnegative_prompt = "blurry, static"\n'
    )
    return dest


def ensure_tiny(variant: str = "i2v") -> Path:
    """Build the tiny checkpoint once into the user's cache and return its folder.

    Safe against concurrent builders (torchrun ranks, parallel tests): a file lock serialises them,
    and each build goes to a temporary folder renamed into place only when complete.
    """
    target = tiny_cache_dir(variant)
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    if (target / "model_index.json").is_file():
        return target
    with open(root / f".tiny-{variant}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model_index.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{variant}-", dir=root))
            try:
                make_tiny(tmp, variant)
                if target.exists():  # a partial folder from an older, interrupted layout
                    shutil.rmtree(target)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
