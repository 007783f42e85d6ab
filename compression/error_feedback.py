"""Error feedback: what a lossy codec drops this round is added to the next round's input.

Per named tensor the residual e follows (Seide et al., 2014; CocktailSGD; DESIGN.md):

    e <- e + x;  c = C(e);  e <- e - D(c)

so the sum of everything decoded so far equals the sum of the inputs minus the current
residual: nothing is lost, only delayed, and as long as the residual stays bounded the
decoded stream tracks the inputs. The residual lives in fp32 whatever the input dtype.

``compress`` computes the new residual but commits it only through the returned
``Pending``: a DiLoCo round that aborts drops the pending value and leaves the residual as
it was (DESIGN.md: no state is half-applied).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pollinate.compression.codec import Codec, CompressionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ErrorFeedbackConfig:
    # residual multiplier per round; 1.0 is classic error feedback (nothing lost), below
    # 1 lets stale residuals fade (SparseLoCo uses 0.95) at the cost of losing that part
    decay: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"error-feedback decay must be in [0, 1], got {self.decay!r}")


@dataclass(frozen=True)
class Pending:
    """A compressed message and the residual that sending it leaves behind."""

    name: str
    data: bytes  # the frame to send
    decoded: torch.Tensor  # D(C(e)), what every receiver will decode, in fp32
    residual: torch.Tensor  # e - D(C(e)), committed by ErrorFeedback.commit


class ErrorFeedback:
    """Residuals per named tensor for one codec."""

    def __init__(self, codec: Codec, config: ErrorFeedbackConfig | None = None) -> None:
        self.codec = codec
        self.config = config if config is not None else ErrorFeedbackConfig()
        self._residuals: dict[str, torch.Tensor] = {}

    def residual(self, name: str) -> torch.Tensor | None:
        return self._residuals.get(name)

    def compress(self, name: str, tensor: torch.Tensor, *, seed: int = 0) -> Pending:
        """Encode tensor + residual; nothing changes until ``commit`` of the result."""
        x = tensor.detach().to(torch.float32)
        previous = self._residuals.get(name)
        if previous is not None and previous.shape != x.shape:
            raise CompressionError(
                f"tensor {name!r} has shape {tuple(x.shape)}, its residual "
                f"{tuple(previous.shape)}")
        carried = x if previous is None else x + previous * self.config.decay
        data = self.codec.encode(carried, seed=seed)  # NaN/Inf in x raises here
        decoded = self.codec.decode(data, seed=seed).to(torch.float32)
        return Pending(name=name, data=data, decoded=decoded, residual=carried - decoded)

    def commit(self, pending: Pending) -> None:
        self._residuals[pending.name] = pending.residual

    def step(self, name: str, tensor: torch.Tensor, *, seed: int = 0) -> bytes:
        """compress + commit, for callers without an abort path."""
        pending = self.compress(name, tensor, seed=seed)
        self.commit(pending)
        return pending.data

    def reset(self, name: str | None = None) -> None:
        """Forget one residual (or all): after a rollback to a state the residual predates."""
        if name is None:
            self._residuals.clear()
        else:
            self._residuals.pop(name, None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in self._residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._residuals = {name: value.detach().to(torch.float32).clone()
                           for name, value in state.items()}
