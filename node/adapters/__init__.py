"""Adapters: a job's trainable parameters on a span, kept apart from the frozen base weights.

A span is shared by inference and by every job the node trains, so adapters never replace
the span's modules or modify its weights. `AdapterHost.attach(span)` puts a forward
pre-hook and a forward hook on each of the span's `nn.Linear` modules, and
`with host.use(adapter): span(...)` makes that adapter apply for the duration of the call
(torch work on a node runs on one thread, so "the adapter in use" is a plain attribute).
An adapter acts in up to three ways, each a method of `Adapter` (defaults: no effect):

- `delta`: a Linear's output is replaced (LoRA adds B A x, IA3 scales the output);
- `scale_input`: a Linear's input is replaced (IA3 on feedforward modules);
- `replacements`: parameters of the span's modules are swapped for the job's own tensors
  during the call and swapped back after it (LayerNorm tuning, full fine-tuning). The base
  tensors are never written, so inference without the job and other jobs see them intact.
- `block_output`: a decoder block's output hidden states are replaced (ReFT's interventions);
  the host hooks the span's blocks (`layers.N`) for it as it hooks the Linear modules;
- `block_inputs`: a decoder block's call arguments are replaced (prefix tuning: positions,
  cache and mask);
- `attention_output`: a block's attention output is replaced, given the attention's inputs
  (LLaMA-Adapter's gated adaption prompt).

An adapter may also bring its own optimizer (`make_optimizer`; GaLore): the default is
torch's AdamW with the job's settings.

Without `use`, the span is the base model. To add a method: a module here with a subclass
of `Adapter` (parameters named as PEFT names them) and an entry in METHODS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pollinate.protocol.shared import JOB_METHODS



class Adapter(nn.Module):
    method: str = ""

    def delta(self, module_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """The adapted output of Linear `module_name` given its input and base output; None = unchanged."""
        return None

    def scale_input(self, module_name: str, x: torch.Tensor) -> torch.Tensor | None:
        """The input Linear `module_name` should see instead of `x`; None = unchanged."""
        return None

    def replacements(self) -> list[tuple[nn.Module, str, nn.Parameter]]:
        """(module, parameter name, the job's tensor) to swap in while the adapter is in use."""
        return []

    def block_output(self, block_name: str, hidden: torch.Tensor) -> torch.Tensor | None:
        """The output decoder block `block_name` ("layers.N") should return instead of `hidden`; None = unchanged."""
        return None

    def block_inputs(self, block_name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The (args, kwargs) decoder block `block_name` should be called with; None = unchanged."""
        return None

    def attention_output(self, block_name: str, attention: nn.Module, kwargs: dict,
                         output: torch.Tensor) -> torch.Tensor | None:
        """What `attention` (the block's self_attn) returns instead of `output`, given its kwargs; None = unchanged."""
        return None

    def make_optimizer(self, spec) -> torch.optim.Optimizer:
        """The job's inner optimizer over this adapter's parameters: AdamW with the job's settings."""
        return torch.optim.AdamW(list(self.parameters()), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)

    def optimizer_state_bytes(self, optimizer: torch.optim.Optimizer) -> int:
        """Bytes of tensors the optimizer keeps for this adapter (moments, projectors)."""
        return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0)

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors under PEFT's names (`base_model.model.model.layers.N...`)."""
        raise NotImplementedError


class AdapterHost:
    """Hooks on a span's Linear modules that apply whichever adapter is in use."""

    def __init__(self) -> None:
        self.active: Adapter | None = None
        self._attached: set[int] = set()

    def attach(self, span: nn.Module) -> None:
        if id(span) in self._attached:
            return
        for name, module in span.named_modules():
            if isinstance(module, nn.Linear):
                module.register_forward_pre_hook(self._pre_hook(name))
                module.register_forward_hook(self._hook(name))
            elif name.count(".") == 1 and name.startswith("layers."):  # a decoder block
                module.register_forward_hook(self._block_hook(name))
                module.register_forward_pre_hook(self._block_pre_hook(name), with_kwargs=True)
            elif name.count(".") == 2 and name.startswith("layers.") and name.endswith(".self_attn"):
                module.register_forward_hook(self._attention_hook(name.rsplit(".", 1)[0]), with_kwargs=True)
        self._attached.add(id(span))

    def _pre_hook(self, name: str):
        def hook(module, inputs):
            adapter = self.active
            if adapter is None:
                return None
            x = adapter.scale_input(name, inputs[0])
            return None if x is None else (x, *inputs[1:])

        return hook

    def _hook(self, name: str):
        def hook(module, inputs, output):
            adapter = self.active
            if adapter is None:
                return None
            return adapter.delta(name, inputs[0], output)

        return hook

    def _block_hook(self, name: str):
        def hook(module, inputs, output):
            adapter = self.active
            if adapter is None or not isinstance(output, torch.Tensor):
                return None
            return adapter.block_output(name, output)

        return hook

    def _block_pre_hook(self, name: str):
        def hook(module, args, kwargs):
            adapter = self.active
            return None if adapter is None else adapter.block_inputs(name, args, kwargs)

        return hook

    def _attention_hook(self, block: str):
        def hook(module, args, kwargs, output):
            adapter = self.active
            if adapter is None:
                return None
            out = adapter.attention_output(block, module, kwargs, output[0])
            return None if out is None else (out, *output[1:])

        return hook

    @contextlib.contextmanager
    def use(self, adapter: Adapter | None) -> Iterator[None]:
        previous, self.active = self.active, adapter
        swapped = []
        try:
            for module, name, tensor in adapter.replacements() if adapter is not None else ():
                swapped.append((module, name, module._parameters[name]))
                module._parameters[name] = tensor
            yield
        finally:
            for module, name, base in reversed(swapped):
                module._parameters[name] = base
            self.active = previous


def matching_modules(span: nn.Module, targets: tuple[str, ...], kind: type[nn.Module] = nn.Linear) -> dict[str, nn.Module]:
    """Modules of `span` of type `kind` whose name's last part is in `targets` ("q_proj", ...)."""
    found = {n: m for n, m in span.named_modules() if isinstance(m, kind) and n.rsplit(".", 1)[-1] in targets}
    if not found:  # e.g. Llama's q_proj on Phi-3, whose blocks fuse it into qkv_proj (node/families.py)
        names = sorted({n.rsplit(".", 1)[-1] for n, m in span.named_modules() if isinstance(m, kind)})
        raise ValueError(f"no {kind.__name__} module of the span matches targets {list(targets)}; "
                         f"its {kind.__name__} modules are {names}")
    return found


def build_adapter(spec, span: nn.Module) -> Adapter:
    """The adapter `spec.method` names, for `span`; ValueError for an unknown or client-side method."""
    if spec.method in CLIENT_METHODS:
        raise ValueError(f"adapter method {spec.method!r} runs on the trainer; nodes hold no adapter for it")
    if spec.method not in METHODS:
        raise ValueError(f"unknown adapter method {spec.method!r}; known: {known_methods()}")
    return METHODS[spec.method](spec, span)


def known_methods() -> list[str]:
    return sorted(JOB_METHODS)


from pollinate.node.adapters.bottleneck import Bottleneck  # noqa: E402
from pollinate.node.adapters.full import Full  # noqa: E402  (the registry's entries)
from pollinate.node.adapters.galore import GaLore  # noqa: E402
from pollinate.node.adapters.ia3 import IA3  # noqa: E402
from pollinate.node.adapters.llama_adapter import LlamaAdapter  # noqa: E402
from pollinate.node.adapters.ln_tuning import LNTuning  # noqa: E402
from pollinate.node.adapters.lora import LoRA  # noqa: E402
from pollinate.node.adapters.prefix import PrefixTuning  # noqa: E402
from pollinate.node.adapters.reft import LoReFT  # noqa: E402

METHODS: dict[str, type[Adapter]] = {"lora": LoRA, "ia3": IA3, "ln-tuning": LNTuning, "full": Full,
                                     "bottleneck": Bottleneck, "reft": LoReFT, "galore": GaLore,
                                     "prefix-tuning": PrefixTuning, "llama-adapter": LlamaAdapter}
# Methods whose trainable state the trainer owns (client/prompt_tuning.py): nodes run the
# base span for them, so they have no entry in METHODS.
CLIENT_METHODS = {name for name, traits in JOB_METHODS.items() if traits.trainer_side}
