"""A span: decoder blocks [start, end) of a model, run exactly as the whole model runs them.

`SpanModule.forward(hidden_states, position_ids, cache=...)` does what the loop inside the
family's `*Model.forward` in transformers does for these blocks (node/families.py): rotary
embeddings from the family's own rotary class (per layer type for Gemma 3), the causal or
sliding-window mask each layer's type asks for (`create_causal_mask`,
`create_sliding_window_causal_mask`), and the family's own decoder layer modules. That is
why chaining spans reproduces the full model's logits: there is no re-implementation to drift.

Without a cache, forward runs a whole sequence (training, `Forward` RPCs). With a
`SpanCache` from `span.new_cache(...)` it runs a session step: one token or a chunk, at
positions that must follow the ones already cached. The serving node keeps one cache per
session and drops it by dropping the object. The cache has the per-layer layout
`generate()` gives the whole model (`DynamicCache(config=...)`): sliding-window layers keep
only their last `sliding_window` tokens.

Block modules are real `nn.Module`s in `span.layers`, keyed by their global index
("10", "11", ...), so `span.named_modules()` gives `layers.10.self_attn.q_proj`: the same
suffix as `model.layers.10.self_attn.q_proj` in the full model, which PEFT adapters use.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping

import torch
from torch import nn

from pollinate.node.families import UnsupportedFamilyError, family_of, layer_types

logger = logging.getLogger(__name__)

class SpanError(ValueError):
    """A span request or a span input is invalid; the message names the bad value."""


def check_span_range(start: int, end: int, num_blocks: int) -> None:
    """Raise SpanError unless 0 <= start < end <= num_blocks."""
    if start >= end:
        raise SpanError(f"span [{start}, {end}) is empty: start must be below end")
    if start < 0 or end > num_blocks:
        raise SpanError(f"span [{start}, {end}) is outside the model's blocks [0, {num_blocks})")


class SpanCache:
    """The KV cache of one session on one span; created by `SpanModule.new_cache`.

    `length` tokens are cached; the next step must bring positions that follow the last
    ones seen, in every batch row, and may not exceed `max_length` tokens in all.
    """

    def __init__(self, *, span_id: tuple[int, int], batch_size: int, max_length: int, config=None) -> None:
        from transformers import DynamicCache

        self.span_id = span_id  # (start, end) of the span that made it; other spans refuse it
        self.batch_size = batch_size  # rows; every step must have exactly this many
        self.max_length = max_length  # tokens; the session's declared maximum
        self.length = 0  # tokens cached so far
        self.next_positions: torch.Tensor | None = None  # (batch,) expected next position ids
        # DynamicCache grows by concatenation, exactly as generate() does by default, so
        # cached decoding matches the local model bit for bit. Layer indices are local;
        # `config` (the span's, whose layer_types are this span's blocks') gives
        # sliding-window layers their own window-long cache, as generate() does.
        self.kv = DynamicCache(config=config)

    def __repr__(self) -> str:
        return f"SpanCache(span={self.span_id}, length={self.length}/{self.max_length}, batch={self.batch_size})"

    @property
    def nbytes(self) -> int:
        """Bytes held by cached keys and values now."""
        total = 0
        for layer in getattr(self.kv, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def check_step(self, span_id: tuple[int, int], batch: int, seq: int, position_ids: torch.Tensor) -> None:
        if span_id != self.span_id:
            raise SpanError(f"cache belongs to span {self.span_id}, not {span_id}")
        if batch != self.batch_size:
            raise SpanError(f"cache was made for batch size {self.batch_size}, got {batch} rows")
        if self.length + seq > self.max_length:
            raise SpanError(
                f"step of {seq} tokens after {self.length} exceeds the session maximum of {self.max_length}"
            )
        if self.next_positions is not None:
            first = position_ids[:, 0].expand(batch)
            if not torch.equal(first.to(self.next_positions.device), self.next_positions):
                raise SpanError(
                    f"position ids {first.tolist()} do not follow the cached ones; "
                    f"expected {self.next_positions.tolist()}"
                )

    def advance(self, seq: int, position_ids: torch.Tensor) -> None:
        self.length += seq
        self.next_positions = (position_ids[:, -1].expand(self.batch_size) + 1).detach().clone()


class SpanModule(nn.Module):
    """Decoder blocks [start, end) of a supported model (node/families.py); build with `ModelFiles.load_span`."""

    def __init__(
        self,
        config,
        start: int,
        end: int,
        *,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
    ) -> None:
        """Blocks with empty (meta) weights; `from_weights` fills them."""
        super().__init__()
        check_span_range(start, end, config.num_hidden_layers)
        try:
            self.family = family_of(config)
        except UnsupportedFamilyError as e:
            raise SpanError(f"no block classes: {e}") from e
        if attn_implementation == "sdpa" and not self.family.supports_sdpa:
            # As transformers does for the whole model (Gemma 2: SDPA cannot soft-cap scores).
            attn_implementation = "eager"
        # Each block's attention type, by global index: picks its mask and its cache layer.
        self.layer_types = layer_types(config)[start:end]
        # A private copy: the attention implementation is chosen per span, not per model,
        # and the config describes this span's blocks only: layer i of the span is block
        # start + i, so per-layer settings (layer_types) are sliced to match the local
        # layer indices the blocks and the cache use.
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = attn_implementation
        if getattr(config, "layer_types", None) is not None:
            self.config.layer_types = list(config.layer_types[start:end])
        self.config.num_hidden_layers = end - start
        self.model_num_blocks = config.num_hidden_layers  # the whole model's (LLaMA-Adapter's top L)
        self.start, self.end = start, end
        self.quant = "none"  # node/quant.py sets "int8" or "int4" once the Linear weights are quantised
        layer_cls = self.family.cls("decoder_layer")
        with torch.device("meta"):
            # layer_idx is the block's index inside this span: it addresses the span's own
            # KV cache, which holds only these blocks.
            self.layers = nn.ModuleDict(
                {str(i): layer_cls(self.config, layer_idx=i - start) for i in range(start, end)}
            )
        # inv_freq stays fp32 whatever the blocks' dtype, as in the full model: change the
        # dtype through from_weights(dtype=...), not span.to(dtype), which would cast it.
        self.rotary_emb = self.family.cls("rotary")(config=self.config).to(device)
        # Gemma 3's rotary class holds one frequency set per layer type and takes the type.
        self._rotary_per_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters

    @classmethod
    def from_weights(
        cls,
        config,
        start: int,
        end: int,
        weights: Mapping[int, Mapping[str, torch.Tensor]],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
    ) -> SpanModule:
        """A span whose block i takes `weights[i]` (keys as inside one decoder layer)."""
        span = cls(config, start, end, device=device, attn_implementation=attn_implementation)
        for i in range(start, end):
            if i not in weights:
                raise SpanError(f"no weights given for block {i}")
            state = {k: v.to(device=device, dtype=dtype) for k, v in weights[i].items()}
            try:
                span.layers[str(i)].load_state_dict(state, strict=True, assign=True)
            except RuntimeError as e:
                raise SpanError(f"weights of block {i} do not fit the config: {e}") from e
        # Base weights are frozen: serving needs no gradients for them, and adapters (LoRA)
        # train their own parameters. Call span.requires_grad_(True) for full fine-tuning.
        span.requires_grad_(False)
        return span.eval()

    # -- what callers ask about a span --------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        """The dtype hidden states must have: the floating-point weights' (a quantised span's
        Linear weights are torchao tensors, int4's with bf16 scales; its norms keep this dtype)."""
        return next(p.dtype for p in self.layers.parameters()
                    if p.is_floating_point() and type(p) in (torch.Tensor, nn.Parameter))

    @property
    def device(self) -> torch.device:
        return next(self.layers.parameters()).device

    def extra_repr(self) -> str:
        return f"blocks=[{self.start}, {self.end}), hidden={self.hidden_size}"

    def cache_bytes_per_token(self, batch_size: int = 1) -> int:
        """KV-cache bytes one token costs on this span (keys and values, all its blocks)."""
        head_dim = getattr(self.config, "head_dim", None) or self.hidden_size // self.config.num_attention_heads
        per_block = 2 * self.config.num_key_value_heads * head_dim * self.dtype.itemsize
        return per_block * self.num_blocks * batch_size

    def new_cache(self, batch_size: int = 1, max_length: int | None = None) -> SpanCache:
        """An empty KV cache for one session of `batch_size` rows and at most `max_length` tokens."""
        max_length = max_length or self.config.max_position_embeddings
        if batch_size <= 0:
            raise SpanError(f"batch_size must be positive, got {batch_size}")
        if not 0 < max_length <= self.config.max_position_embeddings:
            raise SpanError(
                f"max_length must be in [1, {self.config.max_position_embeddings}], got {max_length}"
            )
        return SpanCache(span_id=(self.start, self.end), batch_size=batch_size, max_length=max_length,
                         config=self.config)

    # -- running it -------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        cache: SpanCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the blocks over `hidden_states` (batch, seq, hidden); returns the same shape.

        position_ids: (seq,), (1, seq) or (batch, seq) integers; default: the positions
        after what `cache` holds (0.. without a cache). attention_mask: an optional 2D
        padding mask (batch, cached + seq) of ones and zeros, as transformers takes it.
        """
        batch, seq = self._check_hidden(hidden_states)
        past = cache.length if cache is not None else 0
        position_ids = self._position_ids(position_ids, batch, seq, past, hidden_states.device)
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + seq):
            raise SpanError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, past + seq)}"
            )
        if cache is not None:
            cache.check_step((self.start, self.end), batch, seq, position_ids)
        kv = cache.kv if cache is not None else None
        masks = self.attention_masks(hidden_states, position_ids, kv, attention_mask)
        position_embeddings = self.position_embeddings(hidden_states, position_ids)
        for i, kind in zip(range(self.start, self.end), self.layer_types):
            hidden_states = self.layers[str(i)](
                hidden_states,
                attention_mask=masks[kind],
                position_embeddings=position_embeddings[kind],
                position_ids=position_ids,
                cache=kv,
                use_cache=kv is not None,
            )
        if cache is not None:
            cache.advance(seq, position_ids)
        return hidden_states

    def attention_masks(self, hidden_states, position_ids, kv=None, attention_mask=None) -> dict:
        """Per layer type present in the span, the mask its layers take for these inputs and
        this DynamicCache (``kv``, before the step is added), as the family's model makes it."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        masks = {}
        for kind in dict.fromkeys(self.layer_types):  # the types present, in block order
            make_mask = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make_mask(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=attention_mask,
                cache=kv,
                position_ids=position_ids,
            )
        return masks

    def position_embeddings(self, hidden_states, position_ids) -> dict:
        """Per layer type present in the span, the rotary (cos, sin) for these position ids."""
        kinds = dict.fromkeys(self.layer_types)
        if self._rotary_per_type:
            return {kind: self.rotary_emb(hidden_states, position_ids, kind) for kind in kinds}
        return dict.fromkeys(kinds, self.rotary_emb(hidden_states, position_ids=position_ids))

    def _check_hidden(self, hidden_states: torch.Tensor) -> tuple[int, int]:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            shape = tuple(getattr(hidden_states, "shape", ()))
            raise SpanError(f"hidden_states must be (batch, seq, {self.hidden_size}), got shape {shape}")
        batch, seq, hidden = hidden_states.shape
        if hidden != self.hidden_size:
            raise SpanError(f"hidden size {hidden} does not match the model's {self.hidden_size}")
        if batch == 0 or seq == 0:
            raise SpanError(f"hidden_states has an empty dimension: shape {tuple(hidden_states.shape)}")
        if hidden_states.dtype != self.dtype:
            raise SpanError(f"hidden_states are {hidden_states.dtype}, this span runs in {self.dtype}")
        if hidden_states.device != self.device:
            raise SpanError(f"hidden_states are on {hidden_states.device}, this span is on {self.device}")
        return batch, seq

    def _position_ids(
        self, position_ids: torch.Tensor | None, batch: int, seq: int, past: int, device: torch.device
    ) -> torch.Tensor:
        if position_ids is None:
            # As the family's *Model does: one row, broadcast over the batch.
            return (torch.arange(seq, device=device) + past).unsqueeze(0)
        if position_ids.is_floating_point() or position_ids.is_complex():
            raise SpanError(f"position_ids must be integers, got {position_ids.dtype}")
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
            raise SpanError(
                f"position_ids have shape {tuple(position_ids.shape)}, expected ({seq},), (1, {seq}) or ({batch}, {seq})"
            )
        if int(position_ids.min()) < 0 or int(position_ids.max()) >= self.config.max_position_embeddings:
            raise SpanError(
                f"position ids must be in [0, {self.config.max_position_embeddings}), "
                f"got [{int(position_ids.min())}, {int(position_ids.max())}]"
            )
        return position_ids.to(device)
