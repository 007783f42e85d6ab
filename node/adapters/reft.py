"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning for Language Models") on the
output hidden states of every block of a span.

    Φ(h) = h + Rᵀ(W h + b − R h),   R: [r, d] with orthonormal rows, W: [r, d], b: [r]

laid out as pyreft's LoreftIntervention lays it out: `rotate_layer` holds Rᵀ ([d, r]) under
torch's orthogonal parametrization (so R keeps orthonormal rows through every optimizer
step; what trains is the parametrization's unconstrained `original`), `learned_source` is
the Linear(d, r) W, b. `JobSpec.rank` is r.

Where: the output of every block of the span (pyreft's "block_output" component), at every
position. The paper's best settings intervene on the first and last few prompt positions
only; every position is the variant that keeps a KV-cached generation identical to a full
forward without tracking which positions are the prompt's (pyreft itself intervenes on the
prompt only while generating). Inits: R from a seeded Gaussian made orthonormal by the
parametrization, W Kaiming-uniform (LoRA's init) and b zero, all keyed by (job seed, block),
so the initial state does not depend on how the model is split into spans. Note that
Φ(h) ≠ h at init (Rᵀ(W h − R h) ≠ 0), as in pyreft.

pyreft 0.1 pins transformers 4.45, so it cannot run beside transformers 5: the export
(client/method_export.py) keeps pyreft's tensor names in a documented safetensors file and
a loader puts the interventions on a plain transformers model.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from pollinate.node.adapters import Adapter
from pollinate.node.adapters.lora import init_lora_a


def loreft(h: torch.Tensor, rotate: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h + (W h + b − R h) R, with rotate = Rᵀ [d, r]; pyreft's LoreftIntervention.forward."""
    x = h.to(rotate.dtype)
    rotated = x @ rotate
    return (x + (nn.functional.linear(x, w, b) - rotated) @ rotate.T).to(h.dtype)


class _Intervention(nn.Module):
    def __init__(self, d: int, r: int, seed: int, block: str, device) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(f"{block}.rotate".encode())) % (2**63))
        rotate = nn.Linear(r, d, bias=False)  # .weight is [d, r] = Rᵀ, the shape pyreft keeps
        with torch.no_grad():
            rotate.weight.copy_(torch.randn(d, r, generator=gen, dtype=torch.float64))
        # matrix_exp rather than the Householder map torch picks by default for a tall matrix
        # (and pyreft inherits): Householder multiplies by the sign diagonal of what trains
        # cast to int, so one AdamW step that moves a diagonal entry below 1 zeroes Rᵀ.
        # With the (default) trivialisation what trains starts at zero around the seeded
        # Gaussian's orthonormalisation, and Rᵀ keeps orthonormal columns at every step.
        # Registering completes Rᵀ to a square orthogonal base with draws from the global
        # RNG: seeded here, so every replica (and the local reference) trains the same
        # coordinates of the same base (DiLoCo averages those coordinates).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gen.initial_seed() + 1)
            self.rotate_layer = nn.utils.parametrizations.orthogonal(rotate, orthogonal_map="matrix_exp").to(device)
        w = torch.empty(r, d, dtype=torch.float32)
        init_lora_a(w, seed, f"{block}.learned_source")
        self.learned_source = nn.Linear(d, r, device=device)
        with torch.no_grad():
            self.learned_source.weight.copy_(w)
            self.learned_source.bias.zero_()

        self._rotation: torch.Tensor | None = None  # Rᵀ as of _rotation_key, for calls without autograd
        self._rotation_key: tuple[int, int] | None = None

    def rotation(self) -> torch.Tensor:
        """Rᵀ. The parametrization computes a d x d matrix exponential on every access (per
        block, per call: most of a step's cost on a CPU); without autograd (Forward, Inference
        steps) the value is reused until what trains changes in place (optimizer step, round)."""
        if torch.is_grad_enabled():
            return self.rotate_layer.weight
        original = self.rotate_layer.parametrizations.weight.original
        key = (original._version, original.data_ptr())
        if key != self._rotation_key:
            self._rotation, self._rotation_key = self.rotate_layer.weight.detach(), key
        return self._rotation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return loreft(h, self.rotation(), self.learned_source.weight, self.learned_source.bias)


class LoReFT(Adapter):
    method = "reft"

    def __init__(self, spec, span: nn.Module) -> None:
        super().__init__()
        self.interventions = nn.ModuleDict()
        for name, block in span.named_modules():
            if name.count(".") == 1 and name.startswith("layers."):
                device = next(block.parameters()).device
                self.interventions[name.split(".")[1]] = _Intervention(
                    span.config.hidden_size, spec.rank, spec.seed, name, device)
        if not self.interventions:
            raise ValueError("the span has no decoder blocks to intervene on")

    def block_output(self, block_name: str, hidden: torch.Tensor) -> torch.Tensor | None:
        intervention = self.interventions[block_name.split(".")[1]] if block_name.startswith("layers.") else None
        return None if intervention is None else intervention(hidden)

    def peft_state(self) -> dict[str, torch.Tensor]:
        """pyreft's names per block: the materialised Rᵀ and W, b (the parametrization's
        `original` is what trains; the export carries the matrix it stands for)."""
        state = {}
        for block, iv in self.interventions.items():
            key = f"model.layers.{block}.reft"
            state[f"{key}.rotate_layer"] = iv.rotate_layer.weight.detach().float().cpu().clone()
            state[f"{key}.learned_source.weight"] = iv.learned_source.weight.detach().float().cpu().clone()
            state[f"{key}.learned_source.bias"] = iv.learned_source.bias.detach().float().cpu().clone()
        return state
