"""Adapters: a job's trainable parameters on a span, kept apart from the frozen base weights.

A span is shared by inference and by every job the node trains, so adapters never replace
the span's modules. Instead `AdapterHost.attach(span)` puts one forward hook on each of the
span's `nn.Linear` modules, and `with host.use(adapter): span(...)` makes that adapter's
deltas apply for the duration of the call (torch work on a node runs on one thread, so
"the adapter in use" is a plain attribute). Without `use`, the span is the base model.

To add a method: a module here with a class implementing `Adapter` (parameters named as
PEFT names them, relative to the model's `model.` prefix) and an entry in METHODS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn


class Adapter(Protocol):
    method: str

    def delta(self, module_name: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """The adapted output of `module_name` given its input and base output; None = unchanged."""

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Parameters under PEFT's names (`base_model.model.model.layers.N...lora_A.weight`)."""


class AdapterHost:
    """Forward hooks on a span's Linear modules that apply whichever adapter is in use."""

    def __init__(self) -> None:
        self.active: Adapter | None = None
        self._attached: set[int] = set()

    def attach(self, span: nn.Module) -> None:
        if id(span) in self._attached:
            return
        for name, module in span.named_modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(self._hook(name))
        self._attached.add(id(span))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            adapter = self.active
            if adapter is None:
                return None
            return adapter.delta(name, inputs[0], output)

        return hook

    @contextlib.contextmanager
    def use(self, adapter: Adapter | None) -> Iterator[None]:
        previous, self.active = self.active, adapter
        try:
            yield
        finally:
            self.active = previous


def build_adapter(spec, span: nn.Module) -> Adapter:
    """The adapter `spec.method` names, for `span`; ValueError for an unknown method."""
    if spec.method not in METHODS:
        raise ValueError(f"unknown adapter method {spec.method!r}; known: {sorted(METHODS)}")
    return METHODS[spec.method](spec, span)


from pollinate.node.adapters.lora import LoRA  # noqa: E402  (the registry's entries)

METHODS = {"lora": LoRA}
