"""The tiny checkpoint: the real folder layout, and a cache that concurrent builders cannot corrupt."""

from __future__ import annotations

import json

from wan_spmd.config import inspect_model_folder


def test_tiny_has_the_real_diffusers_layout(tiny_i2v, tiny_t2v):
    for folder, cls, boundary in ((tiny_i2v, "WanImageToVideoPipeline", 0.9), (tiny_t2v, "WanPipeline", 0.875)):
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == cls and index["boundary_ratio"] == boundary
        for sub, files in {
            "tokenizer": ["tokenizer.json", "tokenizer_config.json"],
            "text_encoder": ["config.json", "model.safetensors"],
            "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
            "scheduler": ["scheduler_config.json"],
            "transformer": ["config.json", "diffusion_pytorch_model.safetensors"],
            "transformer_2": ["config.json", "diffusion_pytorch_model.safetensors"],
        }.items():
            for name in files:
                assert (folder / sub / name).is_file(), f"{sub}/{name}"
        info = inspect_model_folder(folder)
        assert info.transformer_config["qk_norm"] == "rms_norm_across_heads"
    assert inspect_model_folder(tiny_i2v).transformer_config["in_channels"] == 36
    assert inspect_model_folder(tiny_t2v).transformer_config["in_channels"] == 16


def test_tiny_ti2v_is_a_one_expert_wan22_vae_folder(tiny_ti2v):
    """The tiny TI2V folder has the official TI2V-5B-Diffusers shape: `WanPipeline` with
    `expand_timesteps`, no `transformer_2`, 48 latent channels, and the Wan2.2 VAE's switches
    (residual blocks, 2x2 patchify, 16x spatial); it is matched to the TI2V family by those facts."""
    index = json.loads((tiny_ti2v / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["expand_timesteps"] is True
    assert "transformer_2" not in index and "boundary_ratio" not in index
    assert not (tiny_ti2v / "transformer_2").exists()
    info = inspect_model_folder(tiny_ti2v)
    assert info.family.name == "wan2.2-ti2v-5b" and info.boundary_ratio is None
    assert (info.transformer_config["in_channels"], info.transformer_config["out_channels"]) == (48, 48)
    vae = info.vae_config
    assert (vae["z_dim"], vae["is_residual"], vae["patch_size"], vae["scale_factor_spatial"]) == (48, True, 2, 16)
