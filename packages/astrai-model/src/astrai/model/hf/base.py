"""`HFConverter` and its registry: how a Hugging Face checkpoint family maps to and from `AutoRegressiveLM`.

A converter is registered under the HF `model_type` it reads (`@HFConverterFactory.register("llama")`) and
translates the HF `config.json` dict into our config and HF tensor names into ours. Converters that can also
write their family implement `config_to_hf` / `state_dict_to_hf`; `export_hf` picks the first such converter
(highest registration priority first) that can represent a given config.

The helpers here cover what every dense family shares: the trunk's config fields and the tensor names of
embeddings, norms, GQA attention, the SwiGLU MLP and the LM head (transformers' Llama naming).
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from astrai.config import AutoRegressiveLMConfig, BaseModelConfig
from astrai.factory import BaseFactory


class HFConverter:
    """One HF family. Subclasses implement the `*_from_hf` pair and, when they can export, the `*_to_hf` pair."""

    def config_from_hf(self, hf: dict[str, Any]) -> AutoRegressiveLMConfig:
        raise NotImplementedError

    def state_dict_from_hf(self, tensors: dict[str, Tensor], cfg: AutoRegressiveLMConfig) -> dict[str, Tensor]:
        raise NotImplementedError

    def config_to_hf(self, cfg: BaseModelConfig) -> dict[str, Any]:
        """The HF `config.json` dict for `cfg`; ValueError saying why when this family cannot represent it."""
        raise ValueError(f"{type(self).__name__} does not export to Hugging Face")

    def state_dict_to_hf(self, state_dict: dict[str, Tensor], cfg: BaseModelConfig) -> dict[str, Tensor]:
        raise ValueError(f"{type(self).__name__} does not export to Hugging Face")


class HFConverterFactory(BaseFactory[HFConverter]):
    """HF checkpoint converters by HF `model_type`."""

    kind = "hf converter"
    base_class = HFConverter


def export_hf(cfg: BaseModelConfig, state_dict: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """HF `config.json` dict and tensors for a model; ValueError listing each family's reason if none fits."""
    reasons = []
    for name in HFConverterFactory.list_by_priority(reverse=True):
        converter = HFConverterFactory.create(name)
        try:
            hf_config = converter.config_to_hf(cfg)
        except ValueError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        return hf_config, converter.state_dict_to_hf(state_dict, cfg)
    raise ValueError(f"this {type(cfg).__name__} has no Hugging Face equivalent ({'; '.join(reasons)})")


# --- config ----------------------------------------------------------------------------------------------


def hf_field(hf: dict[str, Any], key: str) -> Any:
    """`hf[key]`, or a ValueError naming the missing field."""
    if key not in hf:
        raise ValueError(f"Hugging Face config ({hf.get('model_type')}) lacks the field {key!r}")
    return hf[key]


def trunk_config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Our trunk fields (sizes, norm, RoPE, tying) from a transformers config dict (v4 or v5 RoPE keys)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Hugging Face config hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    # transformers v5 writes `rope_parameters` (with rope_theta inside); v4 `rope_theta` + `rope_scaling`.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    partial = rope.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ValueError(f"Hugging Face config partial_rotary_factor={partial!r}: only 1.0 is supported")
    kind = rope.pop("type", None) or rope.get("rope_type", "default")
    rope_scaling = None
    if kind != "default":
        rope_scaling = {**rope, "rope_type": kind}
        if kind in ("llama3", "yarn"):  # transformers defaults the pretraining length like this
            rope_scaling.setdefault("original_max_position_embeddings", hf_field(hf, "max_position_embeddings"))
    n_heads = hf_field(hf, "num_attention_heads")
    return {
        "vocab_size": hf_field(hf, "vocab_size"),
        "dim": hf_field(hf, "hidden_size"),
        "n_layers": hf_field(hf, "num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "head_dim": hf.get("head_dim"),
        "dim_ffn": hf_field(hf, "intermediate_size"),
        "max_len": hf_field(hf, "max_position_embeddings"),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_weight": bool(hf.get("tie_word_embeddings", False)),
    }


def trunk_config_to_hf(cfg: AutoRegressiveLMConfig) -> dict[str, Any]:
    """The transformers config fields every dense family shares (v4 keys, which v5 still reads)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.dim_ffn,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        # `rope_theta` inside the scaling dict (transformers v5 style) would override the one above
        "rope_scaling": {k: v for k, v in cfg.rope_scaling.items() if k != "rope_theta"} if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_weight,
        "hidden_act": "silu",
    }


# --- tensor names ----------------------------------------------------------------------------------------

# (transformers name, our name); `{i}` is the layer index.
_TRUNK_NAMES = [
    ("model.embed_tokens.weight", "embed_tokens.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
    *[
        (f"model.layers.{{i}}.self_attn.{p}_proj.{kind}", f"layers.{{i}}.attention.{p}_proj.{kind}")
        for p in "qkvo"
        for kind in ("weight", "bias")
    ],
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attention.q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attention.k_norm.weight"),
    *[(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"layers.{{i}}.mlp.{p}.weight") for p in ("gate", "up", "down")],
]


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_FROM_HF = [(_compile(hf_name), ours) for hf_name, ours in _TRUNK_NAMES]
_TO_HF = [(_compile(ours), hf_name) for hf_name, ours in _TRUNK_NAMES]


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(name)
        if match:
            return template.replace("{i}", match.groupdict().get("i") or "")
    return None


def rename_trunk(hf_name: str) -> str | None:
    """Our name for a transformers trunk tensor name, or None when it is not a dense-trunk tensor."""
    return _rename(hf_name, _FROM_HF)


def trunk_name_to_hf(name: str) -> str | None:
    """The transformers name for one of our trunk tensor names, or None."""
    return _rename(name, _TO_HF)


def dense_state_dict_from_hf(tensors: dict[str, Tensor], cfg: AutoRegressiveLMConfig) -> dict[str, Tensor]:
    """Rename a dense checkpoint's tensors. HF's stale RoPE buffers are dropped; with tied weights a stored
    `lm_head.weight` is dropped; any other unknown name is kept as is, so loading reports it as unexpected."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        ours = rename_trunk(name) or name
        if ours == "lm_head.weight" and cfg.tie_weight:
            continue
        out[ours] = tensor
    return out


def dense_state_dict_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Transformers names for a dense model's tensors."""
    out = {}
    for name, tensor in state_dict.items():
        hf_name = trunk_name_to_hf(name)
        assert hf_name is not None, f"{name} has no transformers name"  # config_to_hf accepted the model
        out[hf_name] = tensor
    return out
