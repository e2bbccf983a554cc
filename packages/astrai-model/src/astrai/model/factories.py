"""`AttnFactory` and `FFNFactory`: the string-keyed extension points a `DecoderBlock` builds its parts from.

An attention class is built as `AttnFactory.create(attn_type, config=..., layer_id=...)` with the model's config
(`AutoRegressiveLMConfig` or `EncoderConfig`) and the index of its layer. A feed-forward class takes its sizes
first, `FFNFactory.create(ffn_type, dim, dim_ffn, **options)` (the architecture document's signature);
`FFNFactory.from_config(ffn_type, config)` reads those arguments from a model config through the class's
`config_kwargs(config)` when it defines one (DeepSeekMoE's routing options), else passes `config.dim` and
`config.dim_ffn` alone.

Implementations register with `@AttnFactory.register("name")` in their own module; the modules shipped with
astrai are imported at the bottom of this file so that lookup never depends on import order.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from astrai.factory import BaseFactory


class AttnFactory(BaseFactory[nn.Module]):
    """Attention modules by `attn_type` ("gqa", "mla")."""

    kind = "attention"
    base_class = nn.Module

    @classmethod
    def create(cls, attn_type: str, *args: Any, **kwargs: Any) -> nn.Module:
        """The attention registered as `attn_type`, built with exactly these arguments (e.g. config, layer_id)."""
        return super().create(attn_type, *args, **kwargs)


class FFNFactory(BaseFactory[nn.Module]):
    """Feed-forward modules by `ffn_type` ("mlp", "moe")."""

    kind = "ffn"
    base_class = nn.Module

    @classmethod
    def create(cls, ffn_type: str, dim: int, dim_ffn: int, **kwargs: Any) -> nn.Module:
        """The feed-forward registered as `ffn_type`: `dim` model channels, `dim_ffn` hidden ones, `kwargs` its options."""
        return super().create(ffn_type, dim, dim_ffn, **kwargs)

    @classmethod
    def from_config(cls, ffn_type: str, config: Any) -> nn.Module:
        """The `ffn_type` block that a model config describes (see the module docstring)."""
        component = cls.get_component_class(ffn_type)
        config_kwargs = getattr(component, "config_kwargs", None)
        kwargs = config_kwargs(config) if config_kwargs else {"dim": config.dim, "dim_ffn": config.dim_ffn}
        return cls.create(ffn_type, **kwargs)


from astrai.model import attention, mla, mlp, moe  # noqa: E402,F401  (registration)
