"""Several sessions' steps through a span in one pass, each with its own KV cache.

`forward_packed(span, steps)` runs the steps of N inference sessions (each one row, any
number of new tokens, any cache length) as one forward of the span. The new tokens of all
sessions are packed along the sequence axis into one (1, T, hidden) input, so everything
that treats tokens independently (norms, the q/k/v/o projections, the MLP: nearly all the
weights and FLOPs) runs once for all of them as one matrix product. Attention is the only
part that mixes tokens: there, each session's slice of the packed queries attends to its
own keys and values, through its own DynamicCache, with the mask and the attention function
that running the session alone would use. This is Orca's "selective batching" (Yu et al.,
OSDI 2022), which vLLM also uses; unlike left-padding the caches into one batched cache, it
copies no cache, computes nothing on padding, and lets prefills of any length share a pass
with one-token decode steps.

How: the family's own decoder layers run unchanged (node/span.py). Two hooks carry the
sessions through them: the `cache` the layers receive is a `_PackedCache` whose `update`
appends each session's slice of the new keys and values to that session's own DynamicCache,
and for the pass the span's attention implementation is switched to `pollinate_packed`
(registered with transformers' AttentionInterface), which runs the span's real attention
function (sdpa, eager) once per session on that session's queries, keys, values and mask.
The layers forward their keyword arguments to both, so `packed=` reaches them.

Exactness: each session's attention sees exactly the tensors it would alone. The shared
matrix products are computed for T rows at once instead of one: the float sums are the
same terms, but a GEMM may block them differently from a GEMV, so outputs can differ from
running alone in the last bits (measured ~1e-6 relative on SmolLM2, tests/unit/test_packed_forward.py).
Greedy tokens only change where two logits tie to that precision.

Limits (`packable` says why not): every block must be a full-attention block (sliding-window
layers keep a rolling cache whose mask and update this has not been checked against), and
each session one row (batch_size 1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from pollinate.node.span import SpanModule, SpanCache, SpanError

PACKED = "pollinate_packed"  # the attention implementation name registered below


@dataclass
class PackedStep:
    """One session's step: its cache, hidden states (1, seq, hidden) on the span's device in
    its dtype, and their position ids (1, seq)."""

    cache: SpanCache
    hidden: torch.Tensor
    position_ids: torch.Tensor


def packable(span: SpanModule, cache: SpanCache | None, batch_size: int) -> str | None:
    """None if a step of this session may share a packed pass; else why it runs alone."""
    if batch_size != 1:
        return f"batch size {batch_size} (packing takes one row per session)"
    if any(kind != "full_attention" for kind in span.layer_types):
        return "the span has sliding-window layers"
    return None


class _PackedCache:
    """What the layers see as their cache during a packed pass: `update` splits the packed
    keys/values by session, appends each part to that session's DynamicCache, and keeps what
    each returns (the session's whole keys/values) for the attention function."""

    def __init__(self, steps: list[PackedStep], bounds: list[tuple[int, int]]):
        self.steps = steps
        self.bounds = bounds  # (first, end) of each session's tokens along the packed axis
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> per session

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = [
            step.cache.kv.update(key_states[:, :, a:b], value_states[:, :, a:b], layer_idx)
            for step, (a, b) in zip(self.steps, self.bounds)
        ]
        return key_states, value_states  # not read: the packed attention takes self.kv


@dataclass
class _Pass:
    cache: _PackedCache
    masks: list[dict]  # per session: layer type -> the mask it would get alone
    layer_types: list[str]  # by local layer index
    inner: object  # the span's own attention function


def _packed_attention(module, query, key, value, attention_mask, *, packed: _Pass, **kwargs):
    """Per session: the span's attention function on its queries, keys, values and mask."""
    kind = packed.layer_types[module.layer_idx]
    outs = []
    for (a, b), (k, v), masks in zip(packed.cache.bounds, packed.cache.kv[module.layer_idx], packed.masks):
        out, _ = packed.inner(module, query[:, :, a:b], k, v, masks[kind], **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None  # (1, T, heads, head_dim), as attention functions return


AttentionInterface.register(PACKED, _packed_attention)


@contextlib.contextmanager
def _attention_implementation(span: SpanModule, name: str):
    """The span's layers read their attention function from span.config at call time; all
    torch work of a node runs on one thread, so switching it for one pass races nobody."""
    before = span.config._attn_implementation
    span.config._attn_implementation = name
    try:
        yield
    finally:
        span.config._attn_implementation = before


def forward_packed(span: SpanModule, steps: list[PackedStep]) -> list[torch.Tensor]:
    """Each step's output hidden states (1, seq, hidden), as `span.forward(hidden, position_ids,
    cache=cache)` gives them, from one pass. Every cache advances by its step's tokens."""
    if not steps:
        return []
    for step in steps:
        why = packable(span, step.cache, step.hidden.shape[0])
        if why is not None:
            raise SpanError(f"cannot pack this step: {why}")
        batch, seq = span._check_hidden(step.hidden)
        step.cache.check_step((span.start, span.end), batch, seq, step.position_ids)
    bounds, first = [], 0
    for step in steps:
        bounds.append((first, first + step.hidden.shape[1]))
        first += step.hidden.shape[1]
    # Masks as each session alone would get them, from its own cache before this step.
    masks = [span.attention_masks(s.hidden, s.position_ids, s.cache.kv) for s in steps]
    hidden = torch.cat([s.hidden for s in steps], dim=1)
    position_ids = torch.cat([s.position_ids for s in steps], dim=1)
    position_embeddings = span.position_embeddings(hidden, position_ids)
    cache = _PackedCache(steps, bounds)
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(span.config._attn_implementation, None)
    if inner is None:  # "eager" is the layers' own fallback, not in the registry
        inner = _eager_of(span)
    packed = _Pass(cache=cache, masks=masks, layer_types=list(span.layer_types), inner=inner)
    with _attention_implementation(span, PACKED):
        for i, kind in zip(range(span.start, span.end), span.layer_types):
            hidden = span.layers[str(i)](
                hidden,
                attention_mask=None,
                position_embeddings=position_embeddings[kind],
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                packed=packed,
            )
    for step in steps:
        step.cache.advance(step.hidden.shape[1], step.position_ids)
    return [hidden[:, a:b] for a, b in bounds]


def _eager_of(span: SpanModule):
    """The family's eager attention function (what its layers fall back to for "eager")."""
    import sys

    module = sys.modules[type(next(iter(span.layers.values()))).__module__]
    return module.eager_attention_forward
