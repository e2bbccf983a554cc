"""Hugging Face `deepseek_v3` checkpoints (DeepSeek-V3 / R1 layout): config and weight conversion, both ways.

MLA attention + `DeepSeekMoE` with `noaux_tc` routing after `first_k_dense_replace` dense layers. Tensor names,
per layer `i` (HF <-> ours; router and routed experts as in `astrai.model.hf.qwen3_moe`):

    model.layers.i.self_attn.q_proj | q_a_proj | q_b_proj  <-> layers.i.attention.q_proj | q_a_proj | q_b_proj
    model.layers.i.self_attn.q_a_layernorm                 <-> layers.i.attention.q_a_norm
    model.layers.i.self_attn.kv_a_proj_with_mqa            <-> layers.i.attention.kv_a_proj
    model.layers.i.self_attn.kv_a_layernorm                <-> layers.i.attention.kv_norm
    model.layers.i.self_attn.{kv_b_proj,o_proj}            <-> layers.i.attention.{kv_b_proj,o_proj}
    model.layers.i.mlp.shared_experts.{gate,up,down}_proj  <-> layers.i.mlp.shared_experts.j.{gate,up,down}
    model.layers.i.mlp.gate.e_score_correction_bias        <-> layers.i.mlp.e_score_correction_bias

HF fuses the `n_shared_experts` shared experts into one MLP of hidden `n_shared_experts * moe_intermediate_size`;
we keep them as separate experts (same sum), so the fused weight is split into blocks of hidden units.

RoPE layout: with `rope_interleave` (the DeepSeek default) the RoPE channels of q and of the shared key come in
adjacent pairs; transformers rotates them and emits `[evens | odds]`, which is exactly rotate-half RoPE applied
to the channels permuted to `[evens | odds]`. We permute those weight rows once on import, so our runtime has one
RoPE layout and the attention output is identical. Export writes `rope_interleave: false` and needs no permutation.

Multi-token-prediction layers (`model.layers.{num_hidden_layers}...`) are dropped on import.
"""

from __future__ import annotations

import re
from typing import Any

import torch
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
from astrai.model.hf.qwen3_moe import routed_expert_name_to_hf, routed_expert_tensors

# HF attention module name -> ours
_ATTN_NAMES = {
    "q_proj": "q_proj",
    "q_a_proj": "q_a_proj",
    "q_a_layernorm": "q_a_norm",
    "q_b_proj": "q_b_proj",
    "kv_a_proj_with_mqa": "kv_a_proj",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "kv_b_proj",
    "o_proj": "o_proj",
}
_HF_NAMES = {ours: hf for hf, ours in _ATTN_NAMES.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_ATTN = re.compile(rf"self_attn\.({'|'.join(_ATTN_NAMES)})\.weight")
_HF_SHARED = re.compile(r"mlp\.shared_experts\.(gate|up|down)_proj\.weight")
_OUR_ATTN = re.compile(rf"layers\.(\d+)\.attention\.({'|'.join(_HF_NAMES)})\.weight")
_OUR_SHARED = re.compile(r"layers\.(\d+)\.mlp\.shared_experts\.(\d+)\.(gate|up|down)\.weight")


def deinterleave_rope_rows(weight: Tensor, row_block: int, rope_dim: int) -> Tensor:
    """Reorder the last `rope_dim` rows of every `row_block` rows of `weight` from pairs to `[evens | odds]`."""
    blocks = weight.view(-1, row_block, weight.shape[-1])  # (n_blocks, row_block, in)
    perm = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)]) + (row_block - rope_dim)
    order = torch.cat([torch.arange(row_block - rope_dim), perm])
    return blocks[:, order].reshape(weight.shape)


@HFConverterFactory.register("deepseek_v3")
class DeepseekV3Converter(HFConverter):
    """DeepSeek-V3 <-> `AutoRegressiveLM` with `MLA` attention and `DeepSeekMoE` (`noaux_tc`) feed-forwards."""

    # HF's `rope_interleave` (transformers' default True). `config_from_hf` records the checkpoint's value for
    # `state_dict_from_hf`; our config has no such field because our runtime has a single RoPE layout.
    rope_interleave: bool = True

    def config_from_hf(self, hf: dict[str, Any]) -> AutoRegressiveLMConfig:
        self.rope_interleave = bool(hf.get("rope_interleave", True))
        if hf.get("attention_bias"):
            raise ValueError("deepseek_v3 config attention_bias=True is not supported")
        trunk = trunk_config_from_hf(hf)
        # HF writes head_dim = qk_rope_head_dim; ours is the query/key width of a head.
        trunk["head_dim"] = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
        return AutoRegressiveLMConfig(
            **trunk,
            attn_type="mla",
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf.get("kv_lora_rank"),
            qk_nope_head_dim=hf.get("qk_nope_head_dim"),
            qk_rope_head_dim=hf.get("qk_rope_head_dim"),
            v_head_dim=hf.get("v_head_dim"),
            ffn_type="moe",
            n_routed_experts=hf.get("n_routed_experts"),
            n_shared_experts=hf.get("n_shared_experts") or 0,
            n_activated_experts=hf.get("num_experts_per_tok"),
            # transformers routes every deepseek_v3 checkpoint with noaux_tc, whatever `topk_method` says
            topk_method="noaux_tc",
            dim_ffn_expert=hf.get("moe_intermediate_size"),
            n_dense_layers=hf.get("first_k_dense_replace") or 0,
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
            n_group=hf.get("n_group"),
            topk_group=hf.get("topk_group"),
        )

    def state_dict_from_hf(self, tensors: dict[str, Tensor], cfg: AutoRegressiveLMConfig) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        dense: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            layer = _HF_LAYER.fullmatch(name)
            if layer is not None and int(layer[1]) >= cfg.n_layers:
                continue  # multi-token-prediction module
            moe = routed_expert_tensors(name, tensor)
            if moe is not None:
                out.update(moe)
            elif layer is not None and (attn := _HF_ATTN.fullmatch(layer[2])):
                ours = f"layers.{layer[1]}.attention.{_ATTN_NAMES[attn[1]]}.weight"
                out[ours] = self._attention_weight(attn[1], tensor, cfg)
            elif layer is not None and (shared := _HF_SHARED.fullmatch(layer[2])):
                split_dim = 1 if shared[1] == "down" else 0  # hidden units: down's columns, gate/up's rows
                for j, block in enumerate(tensor.chunk(cfg.n_shared_experts, dim=split_dim)):
                    out[f"layers.{layer[1]}.mlp.shared_experts.{j}.{shared[1]}.weight"] = block.contiguous()
            else:
                dense[name] = tensor
        return out | dense_state_dict_from_hf(dense, cfg)

    def _attention_weight(self, hf_name: str, weight: Tensor, cfg: AutoRegressiveLMConfig) -> Tensor:
        if not self.rope_interleave:
            return weight
        if hf_name in ("q_proj", "q_b_proj"):  # rows: n_heads blocks of (nope | rope)
            return deinterleave_rope_rows(weight, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim)
        if hf_name == "kv_a_proj_with_mqa":  # rows: (kv_lora_rank | rope)
            return deinterleave_rope_rows(weight, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim)
        return weight

    def config_to_hf(self, cfg: BaseModelConfig) -> dict[str, Any]:
        if not isinstance(cfg, AutoRegressiveLMConfig) or (cfg.attn_type, cfg.ffn_type) != ("mla", "moe"):
            raise ValueError("needs an AutoRegressiveLMConfig with attn_type='mla' and ffn_type='moe'")
        if cfg.use_gated_attention or cfg.use_qk_norm or cfg.n_kv_heads != cfg.n_heads:
            raise ValueError(
                f"use_gated_attention={cfg.use_gated_attention}, use_qk_norm={cfg.use_qk_norm}, "
                f"n_kv_heads={cfg.n_kv_heads}: DeepSeek-V3 needs False, False and n_kv_heads == n_heads={cfg.n_heads}"
            )
        if cfg.topk_method != "noaux_tc" or cfg.n_shared_experts < 1:
            raise ValueError(
                f"topk_method={cfg.topk_method!r}, n_shared_experts={cfg.n_shared_experts}: DeepSeek-V3 needs "
                "'noaux_tc' and at least one shared expert"
            )
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **trunk_config_to_hf(cfg),
            "head_dim": cfg.qk_rope_head_dim,  # transformers sizes DeepSeek's RoPE by head_dim
            "attention_bias": False,
            "rope_interleave": False,
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "n_routed_experts": cfg.n_routed_experts,
            "n_shared_experts": cfg.n_shared_experts,
            "num_experts_per_tok": cfg.n_activated_experts,
            "moe_intermediate_size": cfg.dim_ffn_expert or cfg.dim_ffn,
            "first_k_dense_replace": cfg.n_dense_layers,
            "norm_topk_prob": cfg.norm_topk_prob,
            "routed_scaling_factor": cfg.routed_scaling_factor,
            "n_group": cfg.n_group,
            "topk_group": cfg.topk_group,
            "topk_method": "noaux_tc",
            "num_nextn_predict_layers": 0,
        }

    def state_dict_to_hf(self, state_dict: dict[str, Tensor], cfg: BaseModelConfig) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        dense: dict[str, Tensor] = {}
        shared: dict[str, list[Tensor]] = {}  # HF name -> the shared experts' blocks, in expert order
        for name, tensor in state_dict.items():
            if (hf_name := routed_expert_name_to_hf(name)) is not None:
                out[hf_name] = tensor
            elif attn := _OUR_ATTN.fullmatch(name):
                out[f"model.layers.{attn[1]}.self_attn.{_HF_NAMES[attn[2]]}.weight"] = tensor
            elif expert := _OUR_SHARED.fullmatch(name):
                hf_name = f"model.layers.{expert[1]}.mlp.shared_experts.{expert[3]}_proj.weight"
                shared.setdefault(hf_name, [None] * cfg.n_shared_experts)[int(expert[2])] = tensor
            else:
                dense[name] = tensor
        for hf_name, blocks in shared.items():
            out[hf_name] = torch.cat(blocks, dim=1 if hf_name.endswith("down_proj.weight") else 0)
        return out | dense_state_dict_to_hf(dense)
