"""A node that lies, for `chaos.py --scenario liar` and tests only (never a production flag).

    python benchmarks/liar_node.py node --blocks 1:3 ...     # the arguments of `pollinate node`

Runs `pollinate node` with a forward hook on the last block of every span it loads: each
output gets Gaussian noise of $LIAR_NOISE (default 0.1) times the output's standard deviation,
whatever path computes it (Forward, a session step, a batched pass). Its answers are
well-formed and plausible, only wrong: what client/spot_check.py must catch.
"""

from __future__ import annotations

import os
import sys

NOISE = float(os.environ.get("LIAR_NOISE", "0.1"))


def _lie(module, inputs, output):
    import torch

    hidden = output[0] if isinstance(output, tuple) else output
    noisy = hidden + NOISE * hidden.std() * torch.randn_like(hidden)
    return (noisy, *output[1:]) if isinstance(output, tuple) else noisy


def main() -> int:
    from pollinate.main import main as pollinate_main
    from pollinate.node.span import SpanModule

    loaded = SpanModule.from_weights.__func__

    def from_weights(cls, config, start, end, *args, **kwargs):
        span = loaded(cls, config, start, end, *args, **kwargs)
        span.layers[str(end - 1)].register_forward_hook(_lie)
        return span

    SpanModule.from_weights = classmethod(from_weights)
    return pollinate_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
