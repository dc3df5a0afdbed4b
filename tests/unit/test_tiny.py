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
