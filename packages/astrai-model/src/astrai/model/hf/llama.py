"""Dense Hugging Face families on the Llama layout, and `llama` / `mistral` themselves.

`DenseConverter` holds what every dense GQA + SwiGLU family shares (Llama, Mistral, Qwen2, Qwen3): the
trunk config, Llama tensor names, sliding-window handling and the export checks. A family adds only its
attention flavour (`attention_from_hf` / `attention_to_hf`).

Sliding-window attention is not implemented: a checkpoint whose window is shorter than its context gets
`max_len = sliding_window`, the length up to which the two attentions are the same thing.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from astrai.config import AutoRegressiveLMConfig, BaseModelConfig
from astrai.model.hf.base import (
    HFConverter,
    HFConverterFactory,
    dense_state_dict_from_hf,
    dense_state_dict_to_hf,
    trunk_config_from_hf,
    trunk_config_to_hf,
)


class DenseConverter(HFConverter):
    """A dense family: GQA attention with RoPE, SwiGLU MLP, RMSNorm, Llama tensor names."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]  # transformers class written to `architectures`

    def attention_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        """Our attention flags (`use_qk_norm`, `attn_bias`) for this family; ValueError for unsupported ones."""
        raise NotImplementedError

    def attention_to_hf(self, cfg: AutoRegressiveLMConfig) -> dict[str, Any]:
        """This family's attention fields for `cfg`; ValueError when the family cannot express its flags."""
        raise NotImplementedError

    def sliding_window(self, hf: dict[str, Any]) -> int | None:
        return hf.get("sliding_window") if hf.get("use_sliding_window") else None

    def config_from_hf(self, hf: dict[str, Any]) -> AutoRegressiveLMConfig:
        if hf.get("mlp_bias"):
            raise ValueError(f"{self.model_type} config mlp_bias=True is not supported")
        fields = trunk_config_from_hf(hf) | self.attention_from_hf(hf)
        window = self.sliding_window(hf)
        if window is not None:
            fields["max_len"] = min(fields["max_len"], window)
        return AutoRegressiveLMConfig(**fields)

    def state_dict_from_hf(self, tensors: dict[str, Tensor], cfg: AutoRegressiveLMConfig) -> dict[str, Tensor]:
        return dense_state_dict_from_hf(tensors, cfg)

    def config_to_hf(self, cfg: BaseModelConfig) -> dict[str, Any]:
        if not isinstance(cfg, AutoRegressiveLMConfig):
            raise ValueError(f"{type(cfg).__name__} is not a causal LM")
        if (cfg.attn_type, cfg.ffn_type) != ("gqa", "mlp"):
            raise ValueError(f"attn_type={cfg.attn_type!r}, ffn_type={cfg.ffn_type!r}: needs 'gqa' and 'mlp'")
        if cfg.use_gated_attention:
            raise ValueError("use_gated_attention=True has no counterpart")
        attention = self.attention_to_hf(cfg)
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            **trunk_config_to_hf(cfg),
            **attention,
        }

    def state_dict_to_hf(self, state_dict: dict[str, Tensor], cfg: BaseModelConfig) -> dict[str, Tensor]:
        return dense_state_dict_to_hf(state_dict)


@HFConverterFactory.register("llama", priority=30)
class LlamaConverter(DenseConverter):
    """Llama 2/3/3.x: plain GQA (no biases, no qk-norm)."""

    model_type = "llama"
    architecture = "LlamaForCausalLM"

    def attention_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        if hf.get("attention_bias"):
            raise ValueError(f"{self.model_type} config attention_bias=True (bias on o_proj too) is not supported")
        return {"use_qk_norm": False, "attn_bias": False}

    def attention_to_hf(self, cfg: AutoRegressiveLMConfig) -> dict[str, Any]:
        if cfg.use_qk_norm or cfg.attn_bias:
            raise ValueError(f"use_qk_norm={cfg.use_qk_norm}, attn_bias={cfg.attn_bias}: Llama has neither")
        return {"attention_bias": False, "mlp_bias": False}


@HFConverterFactory.register("mistral")
class MistralConverter(LlamaConverter):
    """Mistral: Llama weights; `sliding_window` applies whenever it is set (Mistral-7B-v0.1: 4096)."""

    model_type = "mistral"
    architecture = "MistralForCausalLM"

    def sliding_window(self, hf: dict[str, Any]) -> int | None:
        return hf.get("sliding_window")

    def attention_to_hf(self, cfg: AutoRegressiveLMConfig) -> dict[str, Any]:
        return {**super().attention_to_hf(cfg), "sliding_window": None}
