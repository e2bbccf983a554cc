"""Hugging Face checkpoint conversion: one converter per transformers `model_type`, found by name."""

from astrai.model.hf.base import (
    HFConverter,
    HFConverterFactory,
    export_hf,
    rename_trunk,
    trunk_config_from_hf,
    trunk_name_to_hf,
)

__all__ = [
    "HFConverter",
    "HFConverterFactory",
    "export_hf",
    "rename_trunk",
    "trunk_config_from_hf",
    "trunk_name_to_hf",
]

from astrai.model.hf import deepseek, llama, qwen, qwen3_moe  # noqa: F401  (registration)
