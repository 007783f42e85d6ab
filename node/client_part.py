"""The client part of a model: token embeddings in, final norm and LM head out.

A client holds this locally and sends only hidden states through the swarm's spans:
`hidden = part.embed(input_ids)`, the spans in order, then `logits = part.logits(hidden)`.
It uses the family's own classes (node/families.py) so its output matches the full model's
exactly: its embedding (Gemma's multiplies by sqrt(hidden_size)), its final RMSNorm
(Gemma's scales by 1 + weight), and the LM head's soft-capping where the config sets
`final_logit_softcapping` (Gemma 2/3), as the family's `*ForCausalLM.forward` applies it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from pollinate.node.families import UnsupportedFamilyError, family_of
from pollinate.node.span import SpanError

logger = logging.getLogger(__name__)


class ClientPart(nn.Module):
    """Embeddings, final norm and LM head of a supported model; build with `load_client_part`."""

    def __init__(self, config) -> None:
        super().__init__()
        try:
            family = family_of(config)
        except UnsupportedFamilyError as e:
            raise SpanError(f"no client-part classes: {e}") from e
        self.config = config
        # Gemma 2/3: logits = cap * tanh(logits / cap); None for the other families.
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
        with torch.device("meta"):
            if family.embedding:
                # As the family's model builds it; its scale is a non-persistent buffer,
                # rebuilt for real in from_weights.
                self.embed_tokens = family.cls("embedding")(
                    config.vocab_size, config.hidden_size, config.pad_token_id, embed_scale=config.hidden_size**0.5
                )
            else:
                self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
            self.norm = family.cls("norm")(config.hidden_size, eps=config.rms_norm_eps)
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
        if hasattr(part.embed_tokens, "scalar_embed_scale"):
            # The scaled embedding's buffer was made on meta; fp32 as the family makes it
            # (its forward casts it to the weights' dtype).
            part.embed_tokens.embed_scale = torch.tensor(part.embed_tokens.scalar_embed_scale, device=device)
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
        logits = self.lm_head(self.norm(hidden_states))
        cap = self.final_logit_softcapping
        if cap is not None:
            # The same three operations as Gemma2ForCausalLM.forward / Gemma3ForCausalLM.forward.
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap
        return logits

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden_states)
