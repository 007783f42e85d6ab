"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection"): full training of the span's weights, with each weight matrix's gradient
projected to a rank-r subspace so that Adam's moments are r x n instead of m x n.

The trainable state is `full`'s (a per-job copy of every span parameter, swapped in while
the job runs: full.py), so rounds, restore and export are full fine-tuning's; only the
optimizer differs. Per step, for a 2-D weight W (m x n) with gradient G (Algorithm 1 of the
paper, as galore-torch's GaLoreAdamW runs it, projection type "std"):

    every T steps: U, S, Vᵀ = svd(G);  P = U[:, :r] if m < n else Vᵀ[:r]   (the projector)
    R = Pᵀ G (m < n) or G Pᵀ (m >= n)            the gradient in the subspace
    M ← β1 M + (1 − β1) R;  V ← β2 V + (1 − β2) R²        moments of R's shape
    N = M / (√V + ε) · √(1 − β2ᵗ) / (1 − β1ᵗ)             Adam's normalised step
    W ← W − lr · α · (P N or N P);  W ← W − lr · λ · W     back-projected, scale α; weight decay
Vectors (RMSNorm weights) take the same Adam step unprojected. `JobSpec.rank` is r; T and α
are the paper's (200 and 0.25) unless set on the optimizer. galore-torch itself is not used:
its package imports bitsandbytes (its 8-bit variants) at import time; the rule is checked
against an independent transcription of Algorithm 1 in tests/unit/test_methods.py.
"""

from __future__ import annotations

import torch

from pollinate.node.adapters.full import Full

UPDATE_PROJ_GAP = 200  # T: steps between projector refreshes (the paper's setting)
GALORE_SCALE = 0.25  # α: scale of the back-projected step (the paper's setting)
GALORE_EPS = 1e-6  # Adam's ε as galore-torch's GaLoreAdamW has it


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(self, params, *, lr: float, betas: tuple[float, float], weight_decay: float, rank: int,
                 update_proj_gap: int = UPDATE_PROJ_GAP, scale: float = GALORE_SCALE, eps: float = GALORE_EPS):
        if rank <= 0 or update_proj_gap <= 0:
            raise ValueError(f"GaLore needs rank > 0 and update_proj_gap > 0, got {rank}, {update_proj_gap}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if p.grad.dtype == torch.float64 else p.grad.float()
                state = self.state[p]
                step = state.get("step", 0)
                low_rank = p.dim() == 2 and min(p.shape) > group["rank"]
                if low_rank:
                    if step % group["update_proj_gap"] == 0:
                        state["projector"] = projector(grad, group["rank"])
                    grad = project(grad, state["projector"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                step += 1
                state["step"] = step
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] * (1 - beta2 ** step) ** 0.5 / (1 - beta1 ** step)
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                if low_rank:
                    update = project_back(update, state["projector"], p.shape) * group["scale"]
                p.add_(update.to(p.dtype), alpha=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-r projector of a gradient: left singular vectors for a wide matrix, right for a tall one."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return u[:, :rank].contiguous() if grad.shape[0] < grad.shape[1] else vh[:rank, :].contiguous()


def project(grad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return p.T @ grad if grad.shape[0] < grad.shape[1] else grad @ p.T


def project_back(low: torch.Tensor, p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return p @ low if shape[0] < shape[1] else low @ p


class GaLore(Full):
    method = "galore"

    def make_optimizer(self, spec) -> torch.optim.Optimizer:
        return GaLoreAdamW(list(self.parameters()), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                           rank=spec.rank)
