"""Model configs: `AutoRegressiveLMConfig` (decoder LM), `EncoderConfig` (embedding model), `ConfigFactory`.

Field names follow the architecture document (`dim`, `n_layers`, `n_heads`, ...). Every shape constraint the
model relies on is checked here, when the config is built, so an impossible model never reaches torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from astrai.config.base import BaseModelConfig
from astrai.factory import BaseFactory, known_names

ATTN_TYPES = ("gqa", "mla")
FFN_TYPES = ("mlp", "moe")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
POOLING_TYPES = ("mean", "cls", "last")
# rope_scaling kinds with the meaning HF transformers gives them; "default" means no scaling.
ROPE_SCALING_KINDS = ("default", "linear", "dynamic", "yarn", "llama3")
_LLAMA3_KEYS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class ConfigFactory(BaseFactory[BaseModelConfig]):
    """Model config classes by `model_type`."""

    kind = "model config"
    base_class = BaseModelConfig

    @classmethod
    def load(cls, raw: dict[str, Any]) -> BaseModelConfig:
        """Build the config class named by `raw["model_type"]` (default `autoregressive_lm`)."""
        if not isinstance(raw, dict):
            raise ValueError(f"a model config must be a dict, got {type(raw).__name__}")
        model_type = raw.get("model_type") or AutoRegressiveLMConfig.MODEL_TYPE
        return cls.get_component_class(model_type).from_dict({**raw, "model_type": model_type})


def _fail(cfg: object, field: str, value: Any, why: str) -> None:
    raise ValueError(f"{type(cfg).__name__}.{field}={value!r}: {why}")


def _require_positive(cfg: object, *fields: str) -> None:
    for name in fields:
        value = getattr(cfg, name)
        if value is None:
            _fail(cfg, name, value, "is required")
        if value <= 0:
            _fail(cfg, name, value, "must be positive")


def _validate_rope_scaling(cfg: object, scaling: dict[str, Any] | None) -> None:
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING_KINDS:
        _fail(cfg, "rope_scaling", scaling, f"unknown kind {kind!r}; allowed: {list(ROPE_SCALING_KINDS)}")
    if kind == "default":
        return
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        _fail(cfg, "rope_scaling", scaling, "'factor' must be a positive number")
    if kind == "llama3":
        missing = [k for k in _LLAMA3_KEYS if k not in scaling]
        if missing:
            _fail(cfg, "rope_scaling", scaling, f"llama3 scaling needs {missing}")
        if scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
            _fail(cfg, "rope_scaling", scaling, "low_freq_factor must be below high_freq_factor")


@dataclasses.dataclass
class _TrunkConfig(BaseModelConfig):
    """Fields shared by the decoder and the encoder trunk (embedding, attention, RMSNorm, RoPE)."""

    vocab_size: int | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None  # None: n_heads (multi-head attention)
    head_dim: int | None = None  # None: dim // n_heads; Qwen3 sets it explicitly
    dim_ffn: int | None = None
    max_len: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    use_qk_norm: bool = False
    use_gated_attention: bool = False
    attn_bias: bool = False  # bias on q/k/v projections (Qwen2)

    def validate(self) -> None:
        _require_positive(
            self, "vocab_size", "dim", "n_layers", "n_heads", "dim_ffn", "max_len", "norm_eps", "rope_theta"
        )
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _require_positive(self, "n_kv_heads")
        if self.n_heads % self.n_kv_heads:
            _fail(self, "n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                _fail(self, "dim", self.dim, f"must be divisible by n_heads={self.n_heads} (or set head_dim)")
            self.head_dim = self.dim // self.n_heads
        _require_positive(self, "head_dim")
        _validate_rope_scaling(self, self.rope_scaling)

    @property
    def rope_dim(self) -> int:
        """Number of channels per head that RoPE rotates."""
        return self.head_dim


@ConfigFactory.register("autoregressive_lm")
@dataclasses.dataclass
class AutoRegressiveLMConfig(_TrunkConfig):
    """Decoder-only language model: GQA or MLA attention, dense (SwiGLU) or mixture-of-experts FFN."""

    MODEL_TYPE: ClassVar[str] = "autoregressive_lm"

    tie_weight: bool = False
    attn_type: str = "gqa"
    # MLA (DeepSeek-V2/V3): optional low-rank q, compressed KV latent plus one shared RoPE key per token.
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None  # None: qk_nope_head_dim
    # Feed-forward: "mlp" or "moe" (DeepSeekMoE: shared experts + routed experts).
    ffn_type: str = "mlp"
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    n_activated_experts: int | None = None  # top-k routed experts per token
    topk_method: str = "greedy"
    dim_ffn_expert: int | None = None  # hidden size of each expert; None: dim_ffn
    n_dense_layers: int = 0  # the first n layers use a dense MLP (DeepSeek first_k_dense_replace)
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int | None = None  # expert groups for group_limited_greedy / noaux_tc
    topk_group: int | None = None
    aux_loss_coef: float = 0.001  # weight of the load-balancing loss added in training

    def validate(self) -> None:
        super().validate()
        attn_types = known_names("attention", ATTN_TYPES)
        if self.attn_type not in attn_types:
            _fail(self, "attn_type", self.attn_type, f"unknown attention; allowed: {attn_types}")
        ffn_types = known_names("ffn", FFN_TYPES)
        if self.ffn_type not in ffn_types:
            _fail(self, "ffn_type", self.ffn_type, f"unknown feed-forward; allowed: {ffn_types}")
        if self.attn_type == "mla":
            self._validate_mla()
        elif self.head_dim % 2:
            _fail(self, "head_dim", self.head_dim, "must be even (RoPE rotates pairs)")
        if self.ffn_type == "moe":
            self._validate_moe()

    def _validate_mla(self) -> None:
        _require_positive(self, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")
        if self.v_head_dim is None:
            self.v_head_dim = self.qk_nope_head_dim
        _require_positive(self, "v_head_dim")
        if self.q_lora_rank is not None:
            _require_positive(self, "q_lora_rank")
        if self.qk_rope_head_dim % 2:
            _fail(self, "qk_rope_head_dim", self.qk_rope_head_dim, "must be even (RoPE rotates pairs)")
        if self.attn_bias:
            _fail(self, "attn_bias", self.attn_bias, "is not supported with attn_type='mla'")

    def _validate_moe(self) -> None:
        _require_positive(self, "n_routed_experts", "n_activated_experts", "routed_scaling_factor")
        if self.n_activated_experts > self.n_routed_experts:
            _fail(
                self,
                "n_activated_experts",
                self.n_activated_experts,
                f"cannot exceed n_routed_experts={self.n_routed_experts}",
            )
        if self.n_shared_experts < 0:
            _fail(self, "n_shared_experts", self.n_shared_experts, "must be >= 0")
        if self.dim_ffn_expert is not None:
            _require_positive(self, "dim_ffn_expert")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            _fail(self, "n_dense_layers", self.n_dense_layers, f"must be in [0, n_layers={self.n_layers}]")
        if self.aux_loss_coef < 0:
            _fail(self, "aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        if self.topk_method not in TOPK_METHODS:
            _fail(self, "topk_method", self.topk_method, f"allowed: {list(TOPK_METHODS)}")
        if self.topk_method != "greedy":
            _require_positive(self, "n_group", "topk_group")
            if self.n_routed_experts % self.n_group:
                _fail(self, "n_group", self.n_group, f"must divide n_routed_experts={self.n_routed_experts}")
            if self.topk_group > self.n_group:
                _fail(self, "topk_group", self.topk_group, f"cannot exceed n_group={self.n_group}")
            group_size = self.n_routed_experts // self.n_group
            if self.n_activated_experts > self.topk_group * group_size:
                why = f"exceeds the {self.topk_group * group_size} experts of topk_group={self.topk_group} groups"
                _fail(self, "n_activated_experts", self.n_activated_experts, why)
            # noaux_tc scores a group by the sum of its two best experts.
            if self.topk_method == "noaux_tc" and group_size < 2:
                _fail(self, "n_group", self.n_group, "noaux_tc needs at least 2 experts per group")

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attn_type == "mla" else self.head_dim


@ConfigFactory.register("embedding")
@dataclasses.dataclass
class EncoderConfig(_TrunkConfig):
    """Bidirectional encoder producing one embedding per sequence."""

    MODEL_TYPE: ClassVar[str] = "embedding"

    pooling_type: str = "mean"
    normalize_embeddings: bool = False

    def validate(self) -> None:
        super().validate()
        if self.head_dim % 2:
            _fail(self, "head_dim", self.head_dim, "must be even (RoPE rotates pairs)")
        if self.pooling_type not in POOLING_TYPES:
            _fail(self, "pooling_type", self.pooling_type, f"allowed: {list(POOLING_TYPES)}")
