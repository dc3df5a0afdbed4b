"""The tiny random checkpoint: the embedded default for demos, tests and CI.

It is written in exactly the layout of the public Wan-AI/Wan2.2-*-Diffusers folders (the family's
row in `families` says which components and shapes) and loaded through the same loader as real
weights, so tests exercise the real loader. It makes noise, not art.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from wan_spmd.config import TINY_MARK, WAN22_VAE, tiny_cache_dir
from wan_spmd.families import FAMILIES, Family

VARIANTS = {"i2v": "wan2.2-i2v-a14b", "t2v": "wan2.2-t2v-a14b", "ti2v": "wan2.2-ti2v-5b"}
"""`make-tiny --variant` -> the family it imitates."""


def quiet_hub_logging() -> None:
    """diffusers/transformers progress bars and info chatter are noise in our output."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def tiny_tokenizer():
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


def tiny_transformer_config(in_channels: int, out_channels: int = 16) -> dict:
    """A 2-layer, 4-head Wan expert with every architectural switch of the real A14B / 5B one."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=12,  # rotary splits it into t/h/w parts: 4/4/4
        in_channels=in_channels,
        out_channels=out_channels,
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


def expert_in_channels(family: Family) -> int:
    """Noise latents, plus the mask (4) and image latent for channel-concat conditioning."""
    z = family.vae_z_dim
    return 2 * z + 4 if family.conditioning == "channel_concat" else z


def tiny_vae_config(family: Family) -> dict:
    """The family's real VAE with a base of a few channels instead of 96 (Wan2.1) or 160/256 (Wan2.2)
    and one block per level; latent channels and strides stay the family's (the experts need them)."""
    small = dict(dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    if family.vae_z_dim == WAN22_VAE["z_dim"]:
        # The Wan2.2 VAE: residual down/up blocks, 2x2 patchify (16x spatially with 3 downsamples)
        return {**WAN22_VAE, **small, "base_dim": 4, "decoder_base_dim": 4}
    return dict(base_dim=3, z_dim=family.vae_z_dim, **small)


def make_tiny(dest: str | Path, variant: str = "i2v", seed: int = 0) -> Path:
    """Write a tiny random Wan2.2 checkpoint of the variant's family in the real diffusers folder layout."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    family = FAMILIES[VARIANTS[variant]]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    takes_image = family.takes_image
    flow_shift = 5.0 if takes_image else 12.0
    torch.manual_seed(seed)
    quiet_hub_logging()

    tokenizer = tiny_tokenizer()
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
    vae = AutoencoderKLWan(**tiny_vae_config(family))
    vae.save_pretrained(dest / "vae")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=flow_shift,
    ).save_pretrained(dest / "scheduler")
    for name in family.expert_names:
        config = tiny_transformer_config(expert_in_channels(family), family.vae_z_dim)
        WanTransformer3DModel(**config).save_pretrained(dest / name)

    index = {
        "_class_name": family.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        **{name: ["diffusers", "WanTransformer3DModel"] for name in family.expert_names},
    }
    if family.default_boundary_ratio is not None:
        index["boundary_ratio"] = family.default_boundary_ratio
    if family.conditioning == "channel_concat":
        index.update(image_encoder=[None, None], image_processor=[None, None])
    index["expand_timesteps"] = family.expand_timesteps
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    # Defaults small enough for 2 CPU cores; 4 steps put 2 on each expert at boundary 0.9/0.875. An
    # optional image (TI2V) has both: the size without one, the area to fit its aspect in with one.
    size_line = {
        "required": 'max_area = "64x64"',
        "optional": 'size = "64x64"\nmax_area = "64x64"',
        "refused": 'size = "64x64"',
    }[family.image]
    (dest / "generation.toml").write_text(
        f"{TINY_MARK}\n"
        "[generation]\n"
        f"num_inference_steps = 4\nnum_frames = 9\nfps = 8\n{size_line}\n"
        f'flow_shift = {flow_shift}\nnegative_prompt = "blurry, static"\n'
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
