"""The client part of a model: token embeddings in, final norm and LM head out.

A client holds this locally and sends only hidden states through the swarm's spans:
`hidden = part.embed(input_ids)`, the spans in order, then `logits = part.logits(hidden)`.
It uses the model's own RMSNorm class so its output matches the full model's exactly.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping

import torch
from torch import nn

from pollinate.node.span import BLOCK_CLASSES, SpanError

logger = logging.getLogger(__name__)

# model_type -> the transformers class name of its final norm, in BLOCK_CLASSES' module.
_NORM_CLASSES = {"llama": "LlamaRMSNorm"}


class ClientPart(nn.Module):
    """Embeddings, final norm and LM head of a Llama-family model; build with `load_client_part`."""

    def __init__(self, config) -> None:
        super().__init__()
        if config.model_type not in _NORM_CLASSES:
            raise SpanError(f"no client-part classes for model type {config.model_type!r}")
        module = importlib.import_module(BLOCK_CLASSES[config.model_type][0])
        self.config = config
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
            self.norm = getattr(module, _NORM_CLASSES[config.model_type])(
                config.hidden_size, eps=config.rms_norm_eps
            )
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_weights(
        cls,
        config,
        weights: Mapping[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> ClientPart:
        """`weights`: embed_tokens.weight, norm.weight and, unless tied, lm_head.weight."""
        part = cls(config)
        state = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied:
            state.pop("lm_head.weight", None)
        try:
            part.load_state_dict(state, strict=not tied, assign=True)
        except RuntimeError as e:
            raise SpanError(f"client-part weights do not fit the config: {e}") from e
        if tied:
            # One parameter, as in the full model: an adapter on embeddings changes both.
            part.lm_head.weight = part.embed_tokens.weight
        part.requires_grad_(False)
        return part.eval()

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, hidden) input of the first span."""
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise SpanError(f"input_ids must be (batch, seq) integers, got {tuple(input_ids.shape)} {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise SpanError(f"token ids must be in [0, {self.config.vocab_size})")
        return self.embed_tokens(input_ids)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) output of the last span -> (batch, seq, vocab) logits."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise SpanError(
                f"hidden_states must be (batch, seq, {self.hidden_size}), got {tuple(hidden_states.shape)}"
            )
        return self.lm_head(self.norm(hidden_states))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden_states)
