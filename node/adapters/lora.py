"""LoRA (Hu et al. 2021) on a span's Linear modules, laid out exactly as PEFT lays it out.

For a target module W: y = W x + (alpha / r) * B(A(x)), A: [r, in] Kaiming-uniform
(a = sqrt(5), PEFT's and nn.Linear's default), B: [out, r] zeros, so a fresh adapter is
the identity. No dropout (exactness against local training needs a deterministic forward).
Each module's A is drawn from its own generator seeded by (job seed, module name), so the
initial adapter does not depend on how the model is split into spans.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from pollinate.node.adapters import Adapter, matching_modules

PEFT_PREFIX = "base_model.model.model."  # PEFT key prefix of a LlamaForCausalLM's decoder


def init_lora_a(weight: torch.Tensor, seed: int, name: str) -> None:
    """Kaiming-uniform(a=sqrt(5)) as nn.init does, from a generator keyed by (seed, name)."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    fan_in = weight.shape[1]
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # gain sqrt(2/(1+a^2)), a = sqrt(5)
    with torch.no_grad():
        weight.copy_(torch.rand(weight.shape, generator=gen, dtype=torch.float64).mul_(2 * bound).sub_(bound))


class LoRA(Adapter):
    method = "lora"

    def __init__(self, spec, span: nn.Module) -> None:
        super().__init__()
        self.rank = spec.rank
        self.scaling = spec.alpha / spec.rank
        self.names: list[str] = []
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        for name, linear in matching_modules(span, spec.targets).items():
            key = name.replace(".", "__")  # ParameterDict keys may not contain dots
            a = torch.empty(spec.rank, linear.in_features, dtype=torch.float32)
            init_lora_a(a, spec.seed, name)
            # fp32 whatever the span's dtype (PEFT's autocast_adapter_dtype does the same): an
            # AdamW step is ~lr relative, below bf16's 8-bit mantissa, so bf16 adapters on a
            # GPU node would round most updates away
            device = linear.weight.device
            self.lora_a[key] = nn.Parameter(a.to(device=device))
            self.lora_b[key] = nn.Parameter(torch.zeros(linear.out_features, spec.rank, device=device))
            self.names.append(name)
        self._keys = {n: n.replace(".", "__") for n in self.names}

    def delta(self, module_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        key = self._keys.get(module_name)
        if key is None:
            return None
        a, b = self.lora_a[key], self.lora_b[key]
        # The same operations, in the same order, as peft.tuners.lora.Linear.forward
        # (including its cast of the sum back to the base layer's dtype).
        return (output + nn.functional.linear(nn.functional.linear(x.to(a.dtype), a), b) * self.scaling).to(output.dtype)

    def peft_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for name in self.names:
            key = self._keys[name]
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = self.lora_a[key].detach().float().cpu().clone()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = self.lora_b[key].detach().float().cpu().clone()
        return state
