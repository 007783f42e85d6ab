"""Full fine-tuning of a span: every parameter of the span is trainable for the job.

The job owns a copy of the span's weights (not a delta): while the job is in use the
copies are swapped in (node/adapters/__init__.py) and the base tensors, never written,
serve inference and the other jobs. A copy rather than base + delta because training the
copy performs exactly the arithmetic of local training (W + D would round differently),
and costs the same memory as a delta. Memory per job: the span's parameters 4 times over
(the copy, its gradient, AdamW's two moments), in the span's dtype - for SmolLM2-135M's
30 blocks in fp32, about 1.7 GB per job on top of the base weights.

State names are the Hugging Face checkpoint's (`model.layers.N.self_attn.q_proj.weight`),
so the gathered spans plus the client part's weights form a full checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from pollinate.node.adapters import Adapter


class Full(Adapter):
    method = "full"

    def __init__(self, spec, span: nn.Module) -> None:
        super().__init__()
        self.targets: list[tuple[nn.Module, str, str]] = []  # (module, parameter name, full name)
        self.weights = nn.ParameterDict()
        for module_name, module in span.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{pname}" if module_name else pname
                self.weights[full.replace(".", "__")] = nn.Parameter(p.detach().clone())
                self.targets.append((module, pname, full))
        if not self.targets:
            raise ValueError("the span has no parameters to fine-tune")

    def replacements(self) -> list[tuple[nn.Module, str, nn.Parameter]]:
        return [(m, pname, self.weights[full.replace(".", "__")]) for m, pname, full in self.targets]

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {f"model.{full}": self.weights[full.replace(".", "__")].detach().float().cpu().clone()
                for _, _, full in self.targets}
