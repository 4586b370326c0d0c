"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes of length ``n`` at every attention layer.

At layer l, attention over the prefix and the sequence::

    head = softmax(q [K_l^P; K_l]^T / sqrt(d_h)) [V_l^P; V_l],    K_l^P, V_l^P: (heads, n, d_h) trainable

All prefixes form one table ``P``: (n, layers * 2 * kv_heads * d_h), row i holding position i's keys and values of
every layer (layer l: keys at slot 2l, values at 2l+1), exactly PEFT's layout. With ``prefix_projection`` the table
is reparameterised during training as in the paper, ``P = MLP(E)`` with ``E``: (n, token_dim) and
``MLP = Linear(token_dim, encoder_hidden_size) -> tanh -> Linear(encoder_hidden_size, layers * 2 * token_dim)``;
the saved file holds ``P`` alone (PEFT's ``prompt_embeddings``), and loads as a plain table.

The prefixes enter the model as its KV cache (a transformers ``DynamicCache`` holding ``n`` positions per
layer), so the real tokens sit at positions ``n..n+L-1``; the attention mask gets ``n`` leading ones and explicit
position ids are shifted by ``n`` (as PEFT does). Outputs keep their shape. In ``generate`` the prefix fills the
empty cache at prefill; decoding steps find it there. Grouped-query attention: ``token_dim = kv_heads * d_h``
(PEFT's rule). Random init: ``P`` (or ``E``) standard normal, as PEFT's ``nn.Embedding``. Not mergeable.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from ..core.delta import Delta, InputDelta
from ..core.registry import register
from .prompt_tuning import InputLevelConfig, batch_shape, cache_length, extend_mask_and_positions


@register
class PrefixTuningConfig(InputLevelConfig):
    """Prefix tuning: per-layer key/value prefixes of ``num_virtual_tokens`` positions (see module doc).

    prefix_projection: train the prefixes through an MLP (embedding -> encoder_hidden_size -> table);
        ``encoder_hidden_size`` defaults to ``token_dim``.
    token_dim / num_attention_heads: PEFT's names for the key/value width (kv_heads * head_dim) and kv_heads.
    """

    type: ClassVar[str] = "prefix_tuning"
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    peft_constants: ClassVar[dict[str, Any]] = {"auto_mapping": None, "init_weights": None}

    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(None, gt=0)

    def geometry(self, model_config: Any) -> dict[str, int]:
        g = super().geometry(model_config)
        kv = getattr(model_config, "num_key_value_heads", None)
        if kv is not None:  # grouped-query attention: the cache holds kv_heads heads of head_dim
            head_dim = getattr(model_config, "head_dim", None) or g["token_dim"] // g["num_attention_heads"]
            g["token_dim"], g["num_attention_heads"] = head_dim * kv, kv
        elif g["token_dim"] % g["num_attention_heads"]:
            raise ValueError(f"token_dim={g['token_dim']} is not a multiple of num_attention_heads="
                             f"{g['num_attention_heads']}")
        return g

    def for_model(self, model: nn.Module) -> PrefixTuningConfig:
        cfg = super().for_model(model)
        if cfg.encoder_hidden_size is None:
            cfg = cfg.model_copy(update={"encoder_hidden_size": cfg.token_dim})
        return cfg

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if not isinstance(module, nn.Embedding):
            raise ValueError(f"{path}: prefix tuning sits at the input embeddings (nn.Embedding), got "
                             f"{type(module).__name__}")
        if None in (self.token_dim, self.num_layers, self.num_attention_heads):
            raise ValueError("prefix tuning needs token_dim, num_layers and num_attention_heads (for_model fills them)")
        return PrefixTuning(self.num_virtual_tokens, self.num_layers, self.num_attention_heads, self.token_dim,
                            self.encoder_hidden_size or self.token_dim if self.prefix_projection else None)

    def saved_config(self) -> PrefixTuningConfig:
        # the file holds the table P (the MLP's output), as PEFT saves it
        return self.model_copy(update={"prefix_projection": False}) if self.prefix_projection else self

    def peft_extra(self) -> dict[str, Any]:
        return {"encoder_hidden_size": self.encoder_hidden_size, "prefix_projection": self.prefix_projection}

    @classmethod
    def peft_extra_in(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("init_weights") not in (None, "zero"):
            raise ValueError(f"prefix tuning init_weights={d['init_weights']!r} is not supported")
        # PEFT files always hold the table P, whatever prefix_projection was during training
        return {"encoder_hidden_size": d.get("encoder_hidden_size")}


class PrefixTuning(InputDelta):
    """Key/value prefixes: the table ``P`` (n, layers * 2 * token_dim), either a parameter (``prompt_embeddings``)
    or ``transform(embedding)`` with ``embedding`` (n, token_dim) and a two-layer tanh MLP (``prefix_projection``).

    In the cache, layer l gets keys ``P[:, 2l]`` and values ``P[:, 2l+1]``, each viewed as (B, heads, n, d_h).
    """

    def __init__(self, n: int, layers: int, heads: int, token_dim: int, projection: int | None):
        super().__init__()
        self.n, self.layers, self.heads, self.token_dim = n, layers, heads, token_dim
        width = layers * 2 * token_dim
        if projection is None:
            self.prompt_embeddings = nn.Parameter(torch.randn(n, width))
            self.embedding = self.transform = None
        else:
            self.prompt_embeddings = None
            self.embedding = nn.Parameter(torch.randn(n, token_dim))
            self.transform = nn.Sequential(nn.Linear(token_dim, projection), nn.Tanh(), nn.Linear(projection, width))

    def table(self) -> Tensor:
        """P: (n, layers * 2 * token_dim)."""
        return self.prompt_embeddings if self.transform is None else self.transform(self.embedding)

    def export_state(self) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.table().detach()}

    def prepare_inputs(self, inputs: dict, embed: nn.Module) -> dict:
        n = self.n
        cache = inputs.get("cache")
        # generate(use_cache=False) still hands back the cache the last step filled: without use_cache, a cache this
        # delta made is stale
        stale = inputs.get("use_cache") is False and getattr(cache, "_deltatune_prefix", None) is self
        if cache_length(cache) == 0 or stale:  # prefill / plain forward: the cache starts as the prefix
            from transformers import DynamicCache

            b = batch_shape(inputs)[0]
            dtype = embed.weight.dtype
            kv = self.table().to(dtype).view(n, self.layers * 2, self.heads, self.token_dim // self.heads)
            kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, b, -1, -1, -1)  # (2 layers, B, heads, n, d_h)
            cache = DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)])
            cache._deltatune_prefix = self
            inputs["cache"] = cache
        extend_mask_and_positions(inputs, n, prepend_positions=False)
        return inputs
