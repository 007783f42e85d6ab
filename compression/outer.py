"""The DiLoCo outer step from a round's result frames: the one piece of math that both a
member (node/diloco.py) and the coordinator (coordinator/rounds.py) run.

Every member of a round decodes the same owners' result bytes and applies the same outer
optimizer (SGD with Nesterov momentum, fp32, on the CPU) to the same θ_global and momentum,
so all of them end bit-identical; the coordinator runs the very same function on its stored
copy of the previous committed state and the results the owners sent it, and so holds the
new committed state without any member sending it whole (issue 12). The checksum (sha256
over the exact bytes) is what proves the two sides agree.

It lives here, not in node/, because the coordinator may not import pollinate.node
(dependencies point node/coordinator/client -> protocol/compression); it is bytes in
(codec frames) and tensors out, like the rest of this package, and knows nothing of peers,
gRPC or jobs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from pollinate.compression.codec import Codec, CompressionError, get_codec
from pollinate.compression.frame import all_finite

STATE_KEYS = ("global", "momentum")  # the tensors of a committed state, in checksum order


class OuterStepError(ValueError):
    """Result frames that cannot make an outer step (undecodable, wrong length, NaN/Inf)."""


@dataclass(frozen=True, kw_only=True)
class OuterStep:
    """How one round turns result frames into the next state; travels to the coordinator
    with the results (CommitRoundRequest.outer) so that it needs no job settings of its own."""

    # codec id of the round's result frames ("none" for warm-up and solo rounds)
    codec: str
    # the codec's parameters (cocktail: p, k, bits, bucket); JSON-serialisable values
    codec_params: Mapping[str, object] = field(default_factory=dict)
    # outer learning rate and momentum coefficient of this round
    lr: float
    momentum: float
    # Nesterov (True) or heavy-ball momentum
    nesterov: bool = True

    def __post_init__(self) -> None:
        if not self.codec:
            raise ValueError("codec is required")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")

    def params_json(self) -> str:
        return json.dumps(dict(self.codec_params), sort_keys=True)

    def make_codec(self) -> Codec:
        return get_codec(self.codec, **dict(self.codec_params))


def shard_bounds(numel: int, num_shards: int) -> list[tuple[int, int]]:
    """Member j owns [start_j, stop_j): contiguous, sizes differ by at most one element."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    base, extra = divmod(numel, num_shards)
    bounds, start = [], 0
    for j in range(num_shards):
        stop = start + base + (1 if j < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def mask_seed(round_index: int, shard_start: int) -> int:
    """Seed of the codec's random mask: the same for every member, new every round.

    Low 32 bits: a hash of the round and the shard (the cocktail codec's Bernoulli mask
    seeds its generator with them); the bits above: the round itself (its cycled mask moves
    its window by the round).
    """
    if not 0 <= round_index < 1 << 30:
        raise ValueError(f"round_index must be in [0, 2^30), got {round_index}")
    digest = hashlib.sha256(f"diloco-mask:{round_index}:{shard_start}".encode()).digest()
    return (round_index << 32) | int.from_bytes(digest[:4], "little") >> 1  # < 2^62


def outer_step(theta: torch.Tensor, momentum: torch.Tensor, update: torch.Tensor, *,
               lr: float, momentum_coef: float, nesterov: bool) -> None:
    """SGD with momentum on θ_global, in place, as torch.optim.SGD does it (dampening 0)."""
    momentum.mul_(momentum_coef).add_(update)
    direction = update + momentum_coef * momentum if nesterov else momentum
    theta.sub_(lr * direction)


def state_checksum(*tensors: torch.Tensor) -> str:
    """sha256 over the exact bytes: equal only if every member holds bit-identical state."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy())  # the buffer itself: no 4 B/element copy
    return h.hexdigest()


def decode_update(results: Sequence[bytes], codec: Codec, *, numel: int,
                  round_index: int) -> torch.Tensor:
    """The round's averaged pseudo-gradient: shard j decoded from results[j] (fp32)."""
    bounds = shard_bounds(numel, len(results))
    update = torch.empty(numel, dtype=torch.float32)
    for j, ((start, stop), payload) in enumerate(zip(bounds, results)):
        try:
            part = codec.decode(payload, seed=mask_seed(round_index, start)).reshape(-1)
        except CompressionError as exc:
            raise OuterStepError(f"shard {j} result undecodable: {exc}") from exc
        if part.numel() != stop - start or not all_finite(part):
            raise OuterStepError(f"shard {j} result has wrong length or NaN/Inf")
        update[start:stop] = part
    return update


def apply_results(theta: torch.Tensor, momentum: torch.Tensor, results: Sequence[bytes],
                  step: OuterStep, *, round_index: int, codec: Codec | None = None) -> str:
    """Decode every shard's result and take the outer step on (θ_global, momentum) in place;
    returns the checksum of the new state. Nothing changes if a result is bad."""
    codec = codec if codec is not None else step.make_codec()
    update = decode_update(results, codec, numel=theta.numel(), round_index=round_index)
    outer_step(theta, momentum, update, lr=step.lr, momentum_coef=step.momentum, nesterov=step.nesterov)
    return state_checksum(theta, momentum)


def state_to_bytes(theta: torch.Tensor, momentum: torch.Tensor) -> bytes:
    """A committed state as the coordinator stores and serves it (safetensors)."""
    from safetensors.torch import save

    return save({"global": theta.contiguous(), "momentum": momentum.contiguous()})


def state_to_zstd(theta: torch.Tensor, momentum: torch.Tensor, *, level: int = 3) -> bytes:
    """state_to_bytes' output in one zstd frame with its size declared: how a round's base state
    travels (CommitRoundRequest.base_state). Round 1's is the adapter's initialisation, whose
    zeros (a LoRA's B, the momentum) zstd removes."""
    import zstandard

    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(state_to_bytes(theta, momentum))


def state_from_zstd(data: bytes, *, max_bytes: int) -> dict[str, torch.Tensor]:
    """state_to_zstd's output read back; OuterStepError if the frame declares more than
    ``max_bytes`` (checked before anything is decompressed) or is malformed."""
    from pollinate.compression.frame import unzstd

    try:
        return state_from_bytes(unzstd(data, "base state", max_size=max_bytes))
    except CompressionError as exc:
        raise OuterStepError(str(exc)) from exc


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """{"global", "momentum"} from state_to_bytes' output; OuterStepError if malformed."""
    from safetensors.torch import load

    try:
        state = load(data)
    except Exception as exc:  # safetensors raises its own error types on bad headers
        raise OuterStepError(f"state is not a safetensors file: {exc}") from exc
    if set(state) != set(STATE_KEYS):
        raise OuterStepError(f"state holds {sorted(state)}, want {list(STATE_KEYS)}")
    theta, momentum = (state[k].reshape(-1) for k in STATE_KEYS)
    if theta.dtype != torch.float32 or momentum.dtype != torch.float32 or theta.numel() != momentum.numel():
        raise OuterStepError("state tensors must be fp32 and of equal length")
    return {"global": theta, "momentum": momentum}


__all__ = ["OuterStep", "OuterStepError", "STATE_KEYS", "apply_results", "decode_update", "mask_seed",
           "outer_step", "shard_bounds", "state_checksum", "state_from_bytes", "state_from_zstd", "state_to_bytes",
           "state_to_zstd"]
