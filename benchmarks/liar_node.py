"""A node that lies, for `chaos.py --scenario liar` / `liar-backward` and tests only (never a
production flag).

    python benchmarks/liar_node.py node --blocks 1:3 ...     # the arguments of `pollinate node`

Runs `pollinate node` with, where its environment asks for them:
- $LIAR_NOISE (default 0.1): a forward hook on the last block of every span it loads: each
  output gets Gaussian noise of LIAR_NOISE times the output's standard deviation, whatever
  path computes it (Forward, a session step, a batched pass); 0: outputs left alone.
- $LIAR_GRAD_NOISE (default 0): the same for the input gradient every training Backward
  returns (node/training.py backward_step); its adapters still train on the true gradient.
  check_only Backwards (another trainer's spot check) are answered honestly, as a liar that
  reads the flag would.
- $LIAR_RESUMED_NOISE (default 0): the same noise on every step's answer of a session handed
  to it by a leaving node (node/handoff_inbox.py), once its client resumed it; everything
  else (a Forward, the handoff's prefill, its own sessions) is honest. Set LIAR_NOISE=0 with
  it: a liar no spot check can catch before a handoff (tests/integration/test_handoff_evidence_swarm.py).
Its answers are well-formed and plausible, only wrong: what client/spot_check.py must catch.
"""

from __future__ import annotations

import os
import sys

NOISE = float(os.environ.get("LIAR_NOISE", "0.1"))
GRAD_NOISE = float(os.environ.get("LIAR_GRAD_NOISE", "0"))
RESUMED_NOISE = float(os.environ.get("LIAR_RESUMED_NOISE", "0"))


def _noisy(t, level: float):
    import torch

    return t + level * t.std() * torch.randn_like(t)


def _lie(module, inputs, output):
    hidden = output[0] if isinstance(output, tuple) else output
    noisy = _noisy(hidden, NOISE)
    return (noisy, *output[1:]) if isinstance(output, tuple) else noisy


def main() -> int:
    from pollinate.main import main as pollinate_main
    from pollinate.node import training
    from pollinate.node.span import SpanModule

    if NOISE > 0:
        loaded = SpanModule.from_weights.__func__

        def from_weights(cls, config, start, end, *args, **kwargs):
            span = loaded(cls, config, start, end, *args, **kwargs)
            span.layers[str(end - 1)].register_forward_hook(_lie)
            return span

        SpanModule.from_weights = classmethod(from_weights)
    if GRAD_NOISE > 0:
        honest_backward = training.backward_step

        def backward_step(*args, **kwargs):
            grad = honest_backward(*args, **kwargs)
            return None if grad is None else _noisy(grad, GRAD_NOISE)

        training.backward_step = backward_step  # JobManager._backward_sync looks it up per call
    if RESUMED_NOISE > 0:
        from pollinate.node.handoff_inbox import HandoffInbox
        from pollinate.node.span_server import SpanServer

        resumed: set[str] = set()  # ids of the sessions handed here that their clients resumed
        honest_claim, honest_step = HandoffInbox.claim, SpanServer.step

        def claim(self, server, session_id, *args, **kwargs):
            session = honest_claim(self, server, session_id, *args, **kwargs)
            resumed.add(session_id)
            return session

        async def step(self, session, *args, **kwargs):
            out = await honest_step(self, session, *args, **kwargs)
            return _noisy(out, RESUMED_NOISE) if session.session_id in resumed else out

        HandoffInbox.claim, SpanServer.step = claim, step
    return pollinate_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
