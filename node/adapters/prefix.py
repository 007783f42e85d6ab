"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation") on a span, computed exactly as PEFT's PREFIX_TUNING computes it on Llama.

Each block of the span gets P trainable key/value pairs per KV head (`JobSpec.num_virtual_tokens`
= P), seen by every query of every Forward, Backward and Inference of the job as if they
were P tokens cached before the sequence. As in PEFT (the prefix handed to the model as its
past cache), the real tokens' positions start at P, and the prefix keys carry no rotary
embedding. A pre-hook on each decoder block (AdapterHost's `block_inputs`) shifts the
positions and their rotary embeddings by P, prepends the prefix to the keys and values the
attention reads (through the session's cache when there is one, without storing it there)
and widens the attention mask by P always-visible columns.

Memory: the prefix belongs to the job and is shared by its sessions, so it is not stored in
a session's KV cache and costs no session budget; it costs 2 x P x KV heads x head dim
values per block per job. A session's last position, shifted by P, may exceed the model's
max_position_embeddings by P (rotary embeddings are computed, not tabulated, so it runs).

Layout: per block a [P, 2 x KV heads x head dim] tensor, K then V, which is that block's
slice of PEFT's `prompt_embeddings` ([P, blocks x 2 x KV heads x head dim]); the export
concatenates the blocks' slices (`peft_prompt_embeddings`). Initial values N(0, 1) as PEFT's
nn.Embedding, from a generator keyed by (job seed, block).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from pollinate.node.adapters import Adapter

STATE_PREFIX = "prompt_embeddings.layers."  # per-block keys; the export joins them


def peft_prompt_embeddings(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """PEFT's {"prompt_embeddings": [P, blocks x 2 x token_dim]} from the spans' per-block slices."""
    blocks = sorted(int(k[len(STATE_PREFIX):]) for k in state if k.startswith(STATE_PREFIX))
    if blocks != list(range(num_blocks)):
        raise ValueError(f"prefix tuning export: the spans gave blocks {blocks}, the model has {num_blocks}")
    return {"prompt_embeddings": torch.cat([state[f"{STATE_PREFIX}{i}"] for i in blocks], dim=1)}


class _PrefixedCache:
    """What the attention sees as its cache: the session's (or none), with the prefix before it."""

    def __init__(self, inner, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.inner, self.keys, self.values = inner, keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        return torch.cat([self.keys, key_states], dim=2), torch.cat([self.values, value_states], dim=2)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def widen_mask(mask: torch.Tensor | None, prefix: int, positions: torch.Tensor, seq: int,
               dtype: torch.dtype, device) -> torch.Tensor:
    """The block's attention mask with `prefix` visible columns in front. None (plain causal,
    no padding) becomes an explicit boolean mask: SDPA's is_causal would align a query block
    shorter than its keys to the top left."""
    if mask is None:
        past = int(positions.reshape(-1)[0])
        keys = torch.arange(past + seq, device=device)
        causal = keys[None, :] <= (past + torch.arange(seq, device=device))[:, None]
        mask = causal[None, None]
    if mask.dtype == torch.bool:
        front = torch.ones(*mask.shape[:-1], prefix, dtype=torch.bool, device=mask.device)
    else:  # additive float mask: 0 = visible
        front = torch.zeros(*mask.shape[:-1], prefix, dtype=mask.dtype, device=mask.device)
    return torch.cat([front, mask], dim=-1)


class PrefixTuning(Adapter):
    method = "prefix-tuning"

    def __init__(self, spec, span: nn.Module) -> None:
        super().__init__()
        config = span.config
        self.num_virtual = spec.num_virtual_tokens
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._rotary = [span.rotary_emb]  # a list: the span's module, not a submodule of the adapter
        self.prefix = nn.ParameterDict()
        for name, block in span.named_modules():
            if name.count(".") == 1 and name.startswith("layers."):
                gen = torch.Generator().manual_seed((int(spec.seed) * 1_000_003 + zlib.crc32(f"{name}.prefix".encode()))
                                                    % (2**63))
                value = torch.randn(self.num_virtual, 2 * self.kv_heads * self.head_dim, generator=gen)
                # fp32 whatever the span's dtype, as for LoRA (lora.py)
                self.prefix[name.split(".")[1]] = nn.Parameter(value.to(next(block.parameters()).device))
        if not self.prefix:
            raise ValueError("the span has no decoder blocks for a prefix")

    def block_inputs(self, block_name: str, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, seq = hidden.shape[:2]
        kv = self.prefix[block_name.split(".")[1]].to(hidden.dtype)
        kv = kv.view(self.num_virtual, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)  # [2, heads, P, hd]
        keys, values = (t.unsqueeze(0).expand(batch, -1, -1, -1) for t in kv)
        positions = kwargs["position_ids"]
        shifted = positions + self.num_virtual
        kwargs = dict(kwargs, position_ids=shifted, position_embeddings=self._rotary[0](hidden, position_ids=shifted),
                      cache=_PrefixedCache(kwargs.get("cache"), keys, values),
                      attention_mask=widen_mask(kwargs.get("attention_mask"), self.num_virtual, positions, seq,
                                                hidden.dtype, hidden.device))
        return args, kwargs

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {f"{STATE_PREFIX}{block}": p.detach().float().cpu().clone() for block, p in self.prefix.items()}
