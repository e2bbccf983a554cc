"""`AttnFactory` and `FFNFactory`: the string-keyed extension points a `DecoderBlock` builds its parts from.

Every attention or feed-forward class is constructed as `Cls(config, layer_id)` with the model's config
(`AutoRegressiveLMConfig` or `EncoderConfig`) and the index of its layer. Implementations register with
`@AttnFactory.register("name")` in their own module; the modules shipped with astrai are imported at the
bottom of this file so that lookup never depends on import order.
"""

from __future__ import annotations

from torch import nn

from astrai.factory import BaseFactory


class AttnFactory(BaseFactory[nn.Module]):
    """Attention modules by `attn_type` ("gqa", "mla")."""

    kind = "attention"
    base_class = nn.Module


class FFNFactory(BaseFactory[nn.Module]):
    """Feed-forward modules by `ffn_type` ("mlp", "moe")."""

    kind = "ffn"
    base_class = nn.Module


from astrai.model import attention, mla, mlp, moe  # noqa: E402,F401  (registration)
