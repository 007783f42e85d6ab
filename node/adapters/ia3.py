"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning") on a span's Linear modules, laid out exactly as PEFT lays it out.

One learned vector `ia3_l` per target module, initialised to ones (the identity):
attention-side targets scale the module's output (`ia3_l`: [out, 1]), feedforward targets
scale its input (`ia3_l`: [1, in]). Defaults are PEFT's for Llama: targets k_proj, v_proj,
down_proj, with down_proj feedforward.
"""

from __future__ import annotations

import torch
from torch import nn

from pollinate.node.adapters import Adapter, matching_modules
from pollinate.node.adapters.lora import PEFT_PREFIX


class IA3(Adapter):
    method = "ia3"

    def __init__(self, spec, span: nn.Module) -> None:
        super().__init__()
        self.ia3_l = nn.ParameterDict()
        self.feedforward: set[str] = set()
        self.names: list[str] = []
        for name, linear in matching_modules(span, spec.targets).items():
            ff = name.rsplit(".", 1)[-1] in spec.feedforward
            shape = (1, linear.in_features) if ff else (linear.out_features, 1)
            self.ia3_l[name.replace(".", "__")] = nn.Parameter(  # fp32, as for LoRA (lora.py)
                torch.ones(shape, dtype=torch.float32, device=linear.weight.device))
            self.names.append(name)
            if ff:
                self.feedforward.add(name)
        self._keys = {n: n.replace(".", "__") for n in self.names}

    # The same operations, in the same order, as peft.tuners.ia3.Linear.forward.
    def scale_input(self, module_name: str, x: torch.Tensor) -> torch.Tensor | None:
        if module_name not in self.feedforward:
            return None
        scaling = self.ia3_l[self._keys[module_name]]
        return (x.to(scaling.dtype) * scaling.flatten()).to(x.dtype)

    def delta(self, module_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        key = self._keys.get(module_name)
        if key is None or module_name in self.feedforward:
            return None
        return (output * self.ia3_l[key].flatten()).to(output.dtype)

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {f"{PEFT_PREFIX}{n}.ia3_l": self.ia3_l[self._keys[n]].detach().float().cpu().clone() for n in self.names}
