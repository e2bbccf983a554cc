"""Hugging Face `qwen3_moe` checkpoints (Qwen3-30B-A3B, Qwen3-235B-A22B): config and weight conversion.

The trunk is Qwen3's (GQA with per-head q/k RMSNorm before RoPE); the feed-forwards are `DeepSeekMoE` with no
shared experts and `greedy` (softmax top-k) routing. Tensor names, per layer `i` (HF <-> ours):

    model.layers.i.mlp.gate.weight                          <-> layers.i.mlp.router.weight
    model.layers.i.mlp.experts.j.{gate,up,down}_proj.weight <-> layers.i.mlp.routed_experts.j.{gate,up,down}.weight

Checkpoints holding the experts stacked (transformers' in-memory layout `mlp.experts.gate_up_proj` (E, 2F, D)
and `mlp.experts.down_proj` (E, D, F)) are unstacked into the same names. The router/expert renames are shared
with the DeepSeek converter. Qwen3-MoE's `decoder_sparse_step` / `mlp_only_layers` can place dense layers
anywhere; we express "MoE everywhere after the first `n_dense_layers` layers" and reject other layouts.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from astrai.config import AutoRegressiveLMConfig, BaseModelConfig
from astrai.model.hf.base import (
    HFConverterFactory,
    dense_state_dict_from_hf,
    dense_state_dict_to_hf,
    trunk_config_to_hf,
)
from astrai.model.hf.qwen import Qwen3Converter

_HF_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)")
_HF_EXPERT = re.compile(r"experts\.(\d+)\.(gate|up|down)_proj\.weight")
_OUR_MLP = re.compile(r"layers\.(\d+)\.mlp\.(.+)")
_OUR_EXPERT = re.compile(r"routed_experts\.(\d+)\.(gate|up|down)\.weight")


def routed_expert_tensors(name: str, tensor: Tensor) -> dict[str, Tensor] | None:
    """Our tensors for one HF router / routed-expert tensor (DeepSeek and Qwen3-MoE names), else None."""
    match = _HF_MLP.fullmatch(name)
    if match is None:
        return None
    prefix, rest = f"layers.{match[1]}.mlp.", match[2]
    if rest == "gate.weight":
        return {prefix + "router.weight": tensor}
    if rest == "gate.e_score_correction_bias":
        return {prefix + "e_score_correction_bias": tensor}
    if expert := _HF_EXPERT.fullmatch(rest):
        return {f"{prefix}routed_experts.{expert[1]}.{expert[2]}.weight": tensor}
    if rest == "experts.gate_up_proj":  # (E, 2F, D): gate rows first, then up rows
        gate, up = tensor.chunk(2, dim=1)
        out = {f"{prefix}routed_experts.{e}.gate.weight": w for e, w in enumerate(gate.unbind(0))}
        return out | {f"{prefix}routed_experts.{e}.up.weight": w for e, w in enumerate(up.unbind(0))}
    if rest == "experts.down_proj":  # (E, D, F)
        return {f"{prefix}routed_experts.{e}.down.weight": w for e, w in enumerate(tensor.unbind(0))}
    return None


def routed_expert_name_to_hf(name: str) -> str | None:
    """The HF name of one of our router / routed-expert / correction-bias tensors, else None."""
    match = _OUR_MLP.fullmatch(name)
    if match is None:
        return None
    prefix, rest = f"model.layers.{match[1]}.mlp.", match[2]
    if rest == "router.weight":
        return prefix + "gate.weight"
    if rest == "e_score_correction_bias":
        return prefix + "gate.e_score_correction_bias"
    if expert := _OUR_EXPERT.fullmatch(rest):
        return f"{prefix}experts.{expert[1]}.{expert[2]}_proj.weight"
    return None


def _n_dense_layers(hf: dict[str, Any]) -> int:
    """Leading dense layers of a Qwen3-MoE `decoder_sparse_step` / `mlp_only_layers` layout."""
    step = hf.get("decoder_sparse_step", 1)
    dense = sorted(hf.get("mlp_only_layers") or [])
    if step != 1 or dense != list(range(len(dense))) or len(dense) > hf["num_hidden_layers"]:
        raise ValueError(
            f"qwen3_moe decoder_sparse_step={step}, mlp_only_layers={dense}: only MoE in every layer after a "
            "block of leading dense layers (decoder_sparse_step=1, mlp_only_layers=[0, ..., k-1]) is supported"
        )
    return len(dense)


@HFConverterFactory.register("qwen3_moe", priority=20)
class Qwen3MoeConverter(Qwen3Converter):
    """Qwen3-MoE <-> `AutoRegressiveLM` with Qwen3 attention and `DeepSeekMoE` (greedy, no shared experts)."""

    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def config_from_hf(self, hf: dict[str, Any]) -> AutoRegressiveLMConfig:
        dense = super().config_from_hf(hf)  # trunk, Qwen3 attention, sliding window
        return dense.replace(
            ffn_type="moe",
            # transformers v5 writes `num_local_experts`, checkpoints on the Hub `num_experts`
            n_routed_experts=hf.get("num_experts", hf.get("num_local_experts")),
            n_shared_experts=0,
            n_activated_experts=hf.get("num_experts_per_tok"),
            topk_method="greedy",
            dim_ffn_expert=hf.get("moe_intermediate_size"),
            n_dense_layers=_n_dense_layers(hf),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        )

    def state_dict_from_hf(self, tensors: dict[str, Tensor], cfg: AutoRegressiveLMConfig) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        dense: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            moe = routed_expert_tensors(name, tensor)
            if moe is None:
                dense[name] = tensor
            else:
                out.update(moe)
        return out | dense_state_dict_from_hf(dense, cfg)

    def config_to_hf(self, cfg: BaseModelConfig) -> dict[str, Any]:
        if not isinstance(cfg, AutoRegressiveLMConfig) or (cfg.attn_type, cfg.ffn_type) != ("gqa", "moe"):
            raise ValueError("needs an AutoRegressiveLMConfig with attn_type='gqa' and ffn_type='moe'")
        if cfg.use_gated_attention:
            raise ValueError("use_gated_attention=True has no counterpart")
        if (cfg.n_shared_experts, cfg.topk_method, cfg.routed_scaling_factor) != (0, "greedy", 1.0):
            raise ValueError(
                f"n_shared_experts={cfg.n_shared_experts}, topk_method={cfg.topk_method!r}, routed_scaling_factor="
                f"{cfg.routed_scaling_factor}: Qwen3-MoE needs 0, 'greedy', 1.0"
            )
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            **trunk_config_to_hf(cfg),
            **self.attention_to_hf(cfg),
            "num_experts": cfg.n_routed_experts,
            "num_experts_per_tok": cfg.n_activated_experts,
            "moe_intermediate_size": cfg.dim_ffn_expert or cfg.dim_ffn,
            "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(cfg.n_dense_layers)),
            "router_aux_loss_coef": cfg.aux_loss_coef,
        }

    def state_dict_to_hf(self, state_dict: dict[str, Tensor], cfg: BaseModelConfig) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        dense: dict[str, Tensor] = {}
        for name, tensor in state_dict.items():
            hf_name = routed_expert_name_to_hf(name)
            if hf_name is None:
                dense[name] = tensor
            else:
                out[hf_name] = tensor
        return out | dense_state_dict_to_hf(dense)
