"""LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language
Models with Zero-init Attention"), computed exactly as PEFT's ADAPTION_PROMPT computes it
on Llama (peft/tuners/adaption_prompt/layer.py, AdaptedAttention).

In each of the model's top L blocks, an adaption prompt A ([1, len, hidden], N(0, 1) as
PEFT draws it) and a gate g (zero: the zero-init attention) per block. The block's attention
output gains
    o_proj(g · softmax(q kᵀ / √d) v),   k = k_proj(A), v = v_proj(A) (no rotary; KV heads
    repeated), q = the block's rotary-embedded queries
so a fresh adapter is exactly the base model. The hook is AdapterHost's `attention_output`
on the block's self_attn, which sees the attention's own inputs (hidden states, position
embeddings), as PEFT's wrapper does. `JobSpec.num_virtual_tokens` is len and `JobSpec.rank`
is L (PEFT's adapter_len and adapter_layers); the spans below the top L blocks hold no
parameters for the job. Names are PEFT's (`...layers.N.self_attn.adaption_prompt`, `.adaption_gate`).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from pollinate.node.adapters import Adapter
from pollinate.node.adapters.lora import PEFT_PREFIX


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAdapter(Adapter):
    method = "llama-adapter"

    def __init__(self, spec, span: nn.Module) -> None:
        super().__init__()
        config = span.config
        self.adapter_len = spec.num_virtual_tokens
        num_blocks = span.model_num_blocks  # span.config counts the span's own blocks only
        first = num_blocks - spec.rank  # the top L = rank blocks
        if first < 0:
            raise ValueError(f"llama-adapter: {spec.rank} adapter layers (rank) but the model has "
                             f"{num_blocks} blocks")
        self.prompt = nn.ParameterDict()
        self.gate = nn.ParameterDict()
        for name, block in span.named_modules():
            if name.count(".") == 1 and name.startswith("layers.") and int(name.split(".")[1]) >= first:
                n = name.split(".")[1]
                gen = torch.Generator().manual_seed((int(spec.seed) * 1_000_003 + zlib.crc32(f"{name}.adaption".encode()))
                                                    % (2**63))
                device = next(block.parameters()).device
                # fp32 whatever the span's dtype, as for LoRA (lora.py)
                self.prompt[n] = nn.Parameter(torch.randn(1, self.adapter_len, config.hidden_size, generator=gen).to(device))
                self.gate[n] = nn.Parameter(torch.zeros(1, device=device))

    def attention_output(self, block_name: str, attention: nn.Module, kwargs: dict,
                         output: torch.Tensor) -> torch.Tensor | None:
        n = block_name.split(".")[1]
        if n not in self.prompt:
            return None
        hidden = kwargs["hidden_states"]
        bsz, q_len = hidden.shape[:2]
        head_dim = attention.head_dim
        heads = attention.config.num_attention_heads
        factor = attention.k_proj.in_features // attention.k_proj.out_features
        prompt = self.prompt[n].to(hidden.dtype)
        # The same operations, in the same order, as PEFT's AdaptedAttention.forward and
        # llama_compute_query_states.
        key, value = attention.k_proj(prompt), attention.v_proj(prompt)
        adapter_k = key.view(1, self.adapter_len, heads // factor, head_dim).repeat(bsz, 1, 1, 1).transpose(1, 2)
        adapter_v = value.view(1, self.adapter_len, heads // factor, head_dim).repeat(bsz, 1, 1, 1).transpose(1, 2)
        adapter_k = torch.repeat_interleave(adapter_k, repeats=factor, dim=1)
        adapter_v = torch.repeat_interleave(adapter_v, repeats=factor, dim=1)
        query = attention.q_proj(hidden).view(bsz, q_len, heads, head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query = (query * cos) + (rotate_half(query) * sin)
        dtype = query.dtype
        scores = torch.matmul(query, adapter_k.transpose(2, 3).to(dtype)) / math.sqrt(head_dim)
        scores = self.gate[n] * nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        adapter_out = torch.matmul(scores, adapter_v).transpose(1, 2).reshape(bsz, q_len, -1)
        return (output + attention.o_proj(adapter_out)).to(dtype)

    def peft_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for n in self.prompt:
            key = f"{PEFT_PREFIX}layers.{n}.self_attn"
            state[f"{key}.adaption_prompt"] = self.prompt[n].detach().float().cpu().clone()
            state[f"{key}.adaption_gate"] = self.gate[n].detach().float().cpu().clone()
        return state
