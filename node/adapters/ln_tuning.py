"""LayerNorm tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention") as PEFT's LN_TUNING
does it: the span's norm modules (RMSNorm for Llama) get their own trainable copy of the
weight per job, initialised to the base weight. While the job is in use the copy is swapped
in (node/adapters/__init__.py); the base weight is never written.

Targets default to the span's per-block norms, input_layernorm and post_attention_layernorm
(PEFT's Llama default also names the final `norm`, which is on the client, not in a span).
"""

from __future__ import annotations

import torch
from torch import nn

from pollinate.node.adapters import Adapter, matching_modules
from pollinate.node.adapters.lora import PEFT_PREFIX


class LNTuning(Adapter):
    method = "ln-tuning"

    def __init__(self, spec, span: nn.Module) -> None:
        super().__init__()
        self.modules_: dict[str, nn.Module] = matching_modules(span, spec.targets, nn.Module)
        self.weights = nn.ParameterDict({
            name.replace(".", "__"): nn.Parameter(module.weight.detach().clone())
            for name, module in self.modules_.items()
        })

    def replacements(self) -> list[tuple[nn.Module, str, nn.Parameter]]:
        return [(m, "weight", self.weights[n.replace(".", "__")]) for n, m in self.modules_.items()]

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {f"{PEFT_PREFIX}{n}.ln_tuning_layers.weight": self.weights[n.replace(".", "__")].detach().float().cpu().clone()
                for n in self.modules_}
