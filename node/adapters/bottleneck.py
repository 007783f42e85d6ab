"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al. 2021, "AdapterFusion") on a span's sublayer outputs.

For each target Linear (the sublayer's last projection) with output h:
    h' = h + W_up relu(W_down h + b_down) + b_up
so the adapter sits after the sublayer and before the block's residual add, as in Houlsby.
Targets ("o_proj", "down_proj") = Houlsby (after attention and after the MLP), the default;
("down_proj",) = Pfeiffer (after the MLP only). `JobSpec.rank` is the bottleneck width r.
W_down: [r, d] Kaiming-uniform from a generator keyed by (job seed, module name) (LoRA's
init, lora.py), b_down, W_up, b_up zeros: a fresh adapter is the identity (the paper's
near-identity initialisation, exactly). ReLU: AdapterHub's default non-linearity for its
sequential bottleneck configs.

Names follow AdapterHub `adapters`' Llama layout (`model.layers.N.attention_adapters.
adapters.NAME.adapter_down.0.weight`, `adapter_up.weight`, and `output_adapters` for the MLP),
so the export keeps that library's file layout; the library itself cannot be installed beside
transformers 5 (adapters 1.3 pins transformers~=4.57), so client/method_export.py writes it and
loads it back onto a plain transformers model.
"""

from __future__ import annotations

import torch
from torch import nn

from pollinate.node.adapters import Adapter, matching_modules
from pollinate.node.adapters.lora import init_lora_a

ADAPTER_NAME = "pollinate"  # the AdapterHub adapter name in exported keys
PLACES = {"o_proj": "attention_adapters", "down_proj": "output_adapters"}  # target -> AdapterHub's layer


def adapterhub_key(module_name: str, part: str) -> str:
    """`layers.3.self_attn.o_proj`, `adapter_down.0.weight` -> AdapterHub's key in a full model."""
    block = module_name.split(".")[1]
    place = PLACES[module_name.rsplit(".", 1)[-1]]
    return f"model.layers.{block}.{place}.adapters.{ADAPTER_NAME}.{part}"


def bottleneck(h: torch.Tensor, down_w, down_b, up_w, up_b) -> torch.Tensor:
    """h + up(relu(down(h))) in the adapter's dtype (fp32), cast back to h's."""
    x = h.to(down_w.dtype)
    z = nn.functional.relu(nn.functional.linear(x, down_w, down_b))
    return (x + nn.functional.linear(z, up_w, up_b)).to(h.dtype)


class Bottleneck(Adapter):
    method = "bottleneck"

    def __init__(self, spec, span: nn.Module) -> None:
        super().__init__()
        self.names: list[str] = []
        self.params = nn.ParameterDict()
        for name, linear in matching_modules(span, spec.targets).items():
            if name.rsplit(".", 1)[-1] not in PLACES:
                raise ValueError(f"bottleneck adapters go after o_proj and/or down_proj, not {name}")
            d, device = linear.out_features, linear.weight.device
            key = name.replace(".", "__")
            down = torch.empty(spec.rank, d, dtype=torch.float32)
            init_lora_a(down, spec.seed, name)
            # fp32 whatever the span's dtype, as for LoRA (lora.py)
            self.params[f"{key}__down_w"] = nn.Parameter(down.to(device))
            self.params[f"{key}__down_b"] = nn.Parameter(torch.zeros(spec.rank, device=device))
            self.params[f"{key}__up_w"] = nn.Parameter(torch.zeros(d, spec.rank, device=device))
            self.params[f"{key}__up_b"] = nn.Parameter(torch.zeros(d, device=device))
            self.names.append(name)
        self._keys = {n: n.replace(".", "__") for n in self.names}

    def delta(self, module_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        key = self._keys.get(module_name)
        if key is None:
            return None
        p = self.params
        return bottleneck(output, p[f"{key}__down_w"], p[f"{key}__down_b"], p[f"{key}__up_w"], p[f"{key}__up_b"])

    def peft_state(self) -> dict[str, torch.Tensor]:
        parts = {"down_w": "adapter_down.0.weight", "down_b": "adapter_down.0.bias",
                 "up_w": "adapter_up.weight", "up_b": "adapter_up.bias"}
        return {adapterhub_key(n, part): self.params[f"{self._keys[n]}__{short}"].detach().float().cpu().clone()
                for n in self.names for short, part in parts.items()}
