"""Hugging Face `qwen2` (q/k/v projection bias) and `qwen3` (per-head q/k RMSNorm before RoPE) checkpoints."""

from __future__ import annotations

from typing import Any

from astrai.config import AutoRegressiveLMConfig
from astrai.model.hf.base import HFConverterFactory
from astrai.model.hf.llama import DenseConverter


@HFConverterFactory.register("qwen2", priority=20)
class Qwen2Converter(DenseConverter):
    """Qwen2 / Qwen2.5: GQA with bias on q, k and v (always on in transformers' Qwen2Attention)."""

    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"

    def attention_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        return {"use_qk_norm": False, "attn_bias": True}

    def attention_to_hf(self, cfg: AutoRegressiveLMConfig) -> dict[str, Any]:
        if cfg.use_qk_norm or not cfg.attn_bias:
            raise ValueError(f"use_qk_norm={cfg.use_qk_norm}, attn_bias={cfg.attn_bias}: Qwen2 needs False, True")
        return {"use_sliding_window": False}


@HFConverterFactory.register("qwen3", priority=20)
class Qwen3Converter(DenseConverter):
    """Qwen3 dense: GQA with RMSNorm on each q and k head before RoPE, usually an explicit `head_dim`."""

    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"

    def attention_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        if hf.get("attention_bias"):
            raise ValueError("qwen3 config attention_bias=True (bias on o_proj too) is not supported")
        return {"use_qk_norm": True, "attn_bias": False}

    def attention_to_hf(self, cfg: AutoRegressiveLMConfig) -> dict[str, Any]:
        if not cfg.use_qk_norm or cfg.attn_bias:
            raise ValueError(f"use_qk_norm={cfg.use_qk_norm}, attn_bias={cfg.attn_bias}: Qwen3 needs True, False")
        return {"attention_bias": False, "use_sliding_window": False}
