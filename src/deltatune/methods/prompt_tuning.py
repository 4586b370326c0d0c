"""Prompt tuning (Lester et al. 2021): ``n`` trainable virtual-token embeddings prepended to the input.

    E' = [P; E(x)],    P: (n, d) trainable,  E(x): (B, L, d) the frozen input embeddings,  E': (B, n + L, d)

The rest of the model is frozen and unchanged. The attention mask gets ``n`` leading ones, token-level labels
``n`` leading ``-100`` (no loss on virtual positions), token type ids ``n`` leading zeros, explicit position ids
``0..n-1`` for the virtual tokens and ``+n`` for the real ones. As in PEFT, a causal LM returns logits for all
``n + L`` positions (the virtual ones first); a sequence classifier pools as usual (BERT: over position 0, the
first virtual token). In ``generate`` the virtual tokens are injected once, into the prefill; decoding steps then
find them in the KV cache (the attention mask and positions are shifted by ``n``).

Init (``init``): ``"random"`` uniform in [-0.5, 0.5] (the paper's random init), ``"vocab"`` embeddings of tokens
sampled from the vocabulary, ``"text"`` embeddings of an init text's tokens (``init_token_ids``, or ``init_text``
with ``tokenizer``), repeated or truncated to ``n`` (the paper's class-label / text init; PEFT's TEXT).

File format: PEFT's ``PROMPT_TUNING`` (key ``prompt_embeddings``, shape (n, d)). Not mergeable.

Also holds what every input-level method shares (:class:`InputLevelConfig`): the model's geometry and task type,
read from the model's config (``for_model``) as PEFT's prompt-learning configs record them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, InputDelta
from ..core.registry import register
from ..core.targeting import iter_modules, select

TaskType = Literal["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION"]
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForTokenClassification", "TOKEN_CLS"))


def _first(cfg: Any, *names: str) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return None


class InputLevelConfig(DeltaConfig):
    """Fields shared by input-level methods. The geometry fields are filled from the model when left unset.

    num_virtual_tokens: n, the number of virtual tokens / prefix positions.
    task_type: PEFT's task type (``CAUSAL_LM``, ``SEQ_CLS``, ...), from the model class when unset.
    token_dim, num_layers, num_attention_heads: the model's geometry as PEFT records it.
    """

    peft_prefix: ClassVar[str] = "base_model."
    peft_prompt_learning: ClassVar[bool] = True
    peft_fields: ClassVar[dict[str, str]] = {
        "task_type": "task_type", "num_virtual_tokens": "num_virtual_tokens", "token_dim": "token_dim",
        "num_attention_heads": "num_attention_heads", "num_layers": "num_layers"}
    default_targets: ClassVar[str] = "<the model's input embeddings>"

    num_virtual_tokens: int = Field(20, gt=0)
    task_type: TaskType | None = None
    token_dim: int | None = Field(None, gt=0)
    num_layers: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    # -- the model's geometry ----------------------------------------------------------------------
    def geometry(self, model_config: Any) -> dict[str, int]:
        """token_dim, num_layers, num_attention_heads of this method for a model config (PEFT's rules)."""
        layers = _first(model_config, "num_hidden_layers", "n_layer", "num_layers")
        dim = _first(model_config, "hidden_size", "n_embd", "d_model")
        heads = _first(model_config, "num_attention_heads", "n_head", "num_heads")
        missing = [n for n, v in (("num_layers", layers), ("token_dim", dim), ("num_attention_heads", heads)) if v is None]
        if missing:
            raise ValueError(f"{type(self).__name__}: cannot read {missing} from the model's config; give them")
        return {"token_dim": dim, "num_layers": layers, "num_attention_heads": heads}

    def for_model(self, model: nn.Module) -> InputLevelConfig:
        name = type(self).__name__
        get = getattr(model, "get_input_embeddings", None)
        mcfg = getattr(model, "config", None)
        if get is None or mcfg is None:
            raise ValueError(f"{name} needs a transformers model (with a config and input embeddings); "
                             f"{type(model).__name__} has no get_input_embeddings()/config")
        if hasattr(mcfg, "get_text_config"):
            mcfg = mcfg.get_text_config()
        if getattr(mcfg, "is_encoder_decoder", False):
            raise ValueError(f"{name}: encoder-decoder models are not supported (only decoders and encoders)")
        embed = get()
        embed = getattr(embed, "base", embed)  # already wrapped in a Site
        path = next((n for n, m in iter_modules(model) if m is embed and n), None)
        if path is None:
            raise ValueError(f"{name}: the input embeddings of {type(model).__name__} are not one of its modules")
        targets = self.targets if self.targets is not None else [path]
        sel = select(model, self.model_copy(update={"targets": targets}), self.supports)
        if sel.names != [path]:
            raise ValueError(f"{name} acts at the model's input embeddings ({path!r}); targets={self.targets!r} "
                             f"selects {sel.names}")
        update: dict[str, Any] = {"targets": targets}
        for k, v in self.geometry(mcfg).items():
            mine = getattr(self, k)
            if mine is None:
                update[k] = v
            elif mine != v:
                raise ValueError(f"{name}: {k}={mine} in the config, but the model's shape gives {k}={v}")
        if self.task_type is None:
            cls = type(model).__name__
            update["task_type"] = next((t for suffix, t in _TASKS if cls.endswith(suffix)), "FEATURE_EXTRACTION")
        return self.model_copy(update=update)

def cache_length(cache: Any) -> int:
    """Tokens already in a KV cache (0 for none)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    raise TypeError(f"input-level adapters need the KV cache as a transformers Cache, got {type(cache).__name__}")


def batch_shape(inputs: dict) -> tuple[int, int, torch.device]:
    x = inputs.get("input_ids")
    if x is None:
        x = inputs.get("inputs_embeds")
    if x is None:
        raise ValueError("input-level adapters need input_ids or inputs_embeds")
    return x.shape[0], x.shape[1], x.device


def extend_mask_and_positions(inputs: dict, n: int, prepend_positions: bool) -> None:
    """Attention mask: n leading ones; position ids: shifted by n (and 0..n-1 prepended for virtual tokens)."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"input-level adapters need a 2-D attention mask (batch, length), got {mask.dim()}-D")
        inputs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    pos = inputs.get("position_ids")
    if pos is not None:
        pos = pos + n
        if prepend_positions:
            virtual = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
            pos = torch.cat([virtual, pos], dim=-1)
        inputs["position_ids"] = pos


@register
class PromptTuningConfig(InputLevelConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable embeddings prepended to the input (see module doc)."""

    type: ClassVar[str] = "prompt_tuning"
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    peft_constants: ClassVar[dict[str, Any]] = {
        "auto_mapping": None, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None, "tokenizer_kwargs": None}

    init: Literal["random", "vocab", "text"] = "random"
    init_text: str | None = None
    tokenizer: str | None = None  # a local tokenizer folder / name, for init="text" with init_text
    init_token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> PromptTuningConfig:
        if self.init == "text" and self.init_token_ids is None and (self.init_text is None or self.tokenizer is None):
            raise ValueError('init="text" needs init_token_ids, or init_text together with tokenizer')
        if self.init != "text" and (self.init_text is not None or self.init_token_ids is not None):
            raise ValueError(f'init_text/init_token_ids are used only with init="text", not init={self.init!r}')
        if self.init_token_ids is not None and not self.init_token_ids:
            raise ValueError("init_token_ids is empty")
        return self

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if not isinstance(module, nn.Embedding):
            raise ValueError(f"{path}: prompt tuning needs the input embeddings (nn.Embedding), got {type(module).__name__}")
        d = PromptTuning(self.num_virtual_tokens, module.embedding_dim, self.task_type in ("CAUSAL_LM", "TOKEN_CLS"))
        with torch.no_grad():
            if self.init == "random":
                nn.init.uniform_(d.prompt_embeddings, -0.5, 0.5)
            else:
                ids = self._init_ids(module.num_embeddings, path)
                d.prompt_embeddings.copy_(module.weight.detach()[ids.to(module.weight.device)].float())
        return d

    def _init_ids(self, vocab: int, path: str) -> Tensor:
        n = self.num_virtual_tokens
        if self.init == "vocab":
            return torch.randint(0, vocab, (n,))
        ids = self.init_token_ids
        if ids is None:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(self.tokenizer)(self.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"init_text {self.init_text!r} gives no tokens")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"init_token_ids {bad[:5]} are outside the vocabulary of {path} (size {vocab})")
        ids = (list(ids) * math.ceil(n / len(ids)))[:n]  # repeat or truncate to n, as PEFT does
        return torch.tensor(ids)

class PromptTuning(InputDelta):
    """``inputs_embeds = [P; E(x)]`` with ``P = prompt_embeddings`` (n, d), expanded over the batch (B, n, d).

    ``extend_labels``: token-level labels (causal LM, token classification) get ``n`` leading ``-100``.
    """

    def __init__(self, n: int, dim: int, extend_labels: bool):
        super().__init__()
        self.n = n
        self.extend_labels = extend_labels
        self.prompt_embeddings = nn.Parameter(torch.zeros(n, dim))

    def prepare_inputs(self, inputs: dict, embed: nn.Module) -> dict:
        n = self.n
        if cache_length(inputs.get("cache")) > 0:  # decoding: the virtual tokens are in the cache
            extend_mask_and_positions(inputs, n, prepend_positions=False)
            return inputs
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = embed(inputs["input_ids"])
        inputs["input_ids"] = None
        b = embeds.shape[0]
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        extend_mask_and_positions(inputs, n, prepend_positions=True)
        tt = inputs.get("token_type_ids")
        if tt is not None:
            inputs["token_type_ids"] = torch.cat([tt.new_zeros(b, n), tt], dim=1)
        labels = inputs.get("labels")
        if labels is not None and self.extend_labels:
            inputs["labels"] = torch.cat([labels.new_full((b, n), -100), labels], dim=1)
        return inputs
