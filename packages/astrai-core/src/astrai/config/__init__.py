"""Configuration dataclasses: model configs (saved as `config.json`) and the training run config."""

from astrai.config.base import BaseConfig, BaseModelConfig, coerce, live_field, read_json_object
from astrai.config.model_config import (
    ATTN_TYPES,
    FFN_TYPES,
    POOLING_TYPES,
    ROPE_SCALING_KINDS,
    TOPK_METHODS,
    AutoRegressiveLMConfig,
    ConfigFactory,
    EncoderConfig,
)
from astrai.config.train_config import METRICS, LoRAConfig, TrainConfig

__all__ = [
    "ATTN_TYPES",
    "FFN_TYPES",
    "METRICS",
    "POOLING_TYPES",
    "ROPE_SCALING_KINDS",
    "TOPK_METHODS",
    "AutoRegressiveLMConfig",
    "BaseConfig",
    "BaseModelConfig",
    "ConfigFactory",
    "EncoderConfig",
    "LoRAConfig",
    "TrainConfig",
    "coerce",
    "live_field",
    "read_json_object",
]
