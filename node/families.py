"""Model families: which transformers classes run a family's blocks and its client part.

A family is a `model_type` of transformers whose decoder is a list of decoder layers with
rotary positions: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3. Pollinate
never re-implements a family: `SpanModule` builds the family's own decoder layer and rotary
embedding classes, `ClientPart` its own embedding (Gemma's scales by sqrt(hidden_size)) and
final norm (Gemma's multiplies by 1 + weight), and the differences that live in the
family's `*Model.forward` are read from the config:

- layer types (`config.layer_types`, else inferred by transformers: a Mistral or Phi-3
  config with `sliding_window` set makes every layer a sliding-window layer): each layer
  gets the causal or the sliding-window mask, and the KV cache the same per-layer layout
  (`DynamicSlidingWindowLayer` keeps the last `sliding_window` tokens) as `generate()` uses;
- rotary embeddings per layer type when the family's rotary class takes one (Gemma 3's
  local and global frequencies);
- `final_logit_softcapping` on the LM head (Gemma 2/3), attention soft-capping inside the
  layer (Gemma 2, which then needs eager attention: its model class does not support SDPA).

To add a family: an entry in FAMILIES, a tiny random config in tests/unit/test_families.py,
and the exactness tests there pass.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

# The layer types SpanModule knows how to mask; transformers has others (chunked, linear, ...).
LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedFamilyError(ValueError):
    """The config's model type (or one of its settings) is not something Pollinate can run."""


@dataclass(frozen=True, kw_only=True)
class Family:
    """One model family: the names of its classes in its transformers module."""

    model_type: str  # config.model_type, e.g. "qwen2"
    name: str  # for people: "Qwen2"
    module: str  # the transformers module holding the classes below
    decoder_layer: str  # one decoder block, built with (config, layer_idx)
    rotary: str  # rotary embedding, built with (config=...)
    norm: str  # final RMSNorm, built with (hidden_size, eps=...)
    pretrained: str  # the family's PreTrainedModel: what attention implementations it supports
    # The embedding class when it is not a plain nn.Embedding (Gemma's scaled one, built with
    # (vocab, hidden, padding_idx, embed_scale=hidden ** 0.5) as the family's model builds it).
    embedding: str = ""
    # LoRA's default targets for the family when a job names none: PEFT's mapping where it
    # has one (q_proj, v_proj for all but Phi-3); Phi-3 fuses q/k/v into qkv_proj.
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def cls(self, attr: str) -> Any:
        """The transformers class named by field `attr` ("decoder_layer", "rotary", ...)."""
        return getattr(importlib.import_module(self.module), getattr(self, attr))

    @property
    def supports_sdpa(self) -> bool:
        return bool(getattr(self.cls("pretrained"), "_supports_sdpa", False))


def _family(model_type: str, name: str, prefix: str, module: str | None = None, **kw) -> Family:
    module = module or model_type
    return Family(model_type=model_type, name=name, module=f"transformers.models.{module}.modeling_{module}",
                  decoder_layer=f"{prefix}DecoderLayer", rotary=f"{prefix}RotaryEmbedding",
                  norm=f"{prefix}RMSNorm", pretrained=f"{prefix}PreTrainedModel", **kw)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _family("llama", "Llama", "Llama"),
    _family("mistral", "Mistral", "Mistral"),
    _family("qwen2", "Qwen2", "Qwen2"),
    _family("qwen3", "Qwen3", "Qwen3"),
    _family("gemma2", "Gemma 2", "Gemma2", embedding="Gemma2TextScaledWordEmbedding"),
    _family("gemma3_text", "Gemma 3", "Gemma3", module="gemma3", embedding="Gemma3TextScaledWordEmbedding"),
    _family("phi3", "Phi-3", "Phi3", lora_targets=("qkv_proj",)),
)}

# Model types a user is likely to name that are close to a supported one, and what to do.
_HINTS = {
    "gemma3": "a multimodal Gemma 3 checkpoint; its text decoder (model_type gemma3_text, e.g. "
              "google/gemma-3-1b-it) is supported, the vision tower is not",
    "gemma": "Gemma 1 is not supported yet; Gemma 2 and Gemma 3 (text) are",
    "phi": "Phi-1/Phi-2 (model_type phi) are not supported; Phi-3 (phi3) is",
    "qwen2_moe": "mixture-of-experts blocks are not supported",
    "qwen3_moe": "mixture-of-experts blocks are not supported",
    "mixtral": "mixture-of-experts blocks are not supported",
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_of(config: Any) -> Family:
    """The family of `config`; UnsupportedFamilyError names what is not supported and why."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        arch = getattr(config, "architectures", None)
        hint = f" ({_HINTS[model_type]})" if model_type in _HINTS else ""
        raise UnsupportedFamilyError(
            f"model type {model_type!r} (architectures {arch}) is not supported{hint}; Pollinate runs "
            f"{', '.join(f'{f.name} ({t})' for t, f in FAMILIES.items())} decoders"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedFamilyError(f"{family.name} with use_bidirectional_attention (an embedding model) "
                                     "is not a causal decoder; it is not supported")
    unknown = sorted(set(layer_types(config)) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedFamilyError(f"{family.name} config has layer types {unknown}; SpanModule runs {list(LAYER_TYPES)}")
    return family


def layer_types(config: Any) -> list[str]:
    """Each block's attention type, as transformers' DynamicCache lays out its cache."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    return list(get_layer_types_and_kwargs(config)[0])


def lora_targets(model_type: str) -> tuple[str, ...]:
    """LoRA's default target modules for a family (see Family.lora_targets)."""
    family = FAMILIES.get(model_type)
    return family.lora_targets if family is not None else FAMILIES["llama"].lora_targets
