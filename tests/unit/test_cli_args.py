"""client/cli_args.swarm_peers: where every client command (train, export, the demo's trainers)
gets its DHT bootstrap peers and the swarm CA from, the same way from_pretrained does."""

from __future__ import annotations

from argparse import Namespace

import pytest


def test_the_coordinator_is_asked_also_with_initial_peers(monkeypatch):
    """With both flags the coordinator is asked too: a --data-tls swarm's CA comes from its
    answer (before, `train --initial-peers X --coordinator C` dialled TLS nodes in plaintext)."""
    import pollinate.client.remote_model as remote_model
    from pollinate.client.cli_args import swarm_peers

    asked = []

    def coordinator_peers(address, token, tls=None):
        asked.append((address, token, tls))
        return ["/ip4/10.0.0.1/tcp/7000/p2p/QmCoordinator"]

    monkeypatch.setattr(remote_model, "_coordinator_peers", coordinator_peers)

    def args(**kw):
        return Namespace(**{"initial_peers": [], "coordinator": None, "coordinator_tls": None, "swarm_ca": None,
                            **kw})

    assert swarm_peers(args(initial_peers=["/ip4/10.0.0.2/tcp/1/p2p/QmA"], coordinator="c:1"), "t") == [
        "/ip4/10.0.0.2/tcp/1/p2p/QmA", "/ip4/10.0.0.1/tcp/7000/p2p/QmCoordinator"]
    assert asked == [("c:1", "t", None)]
    assert swarm_peers(args(initial_peers=["/ip4/10.0.0.2/tcp/1/p2p/QmA"]), "t") == ["/ip4/10.0.0.2/tcp/1/p2p/QmA"]
    assert swarm_peers(args(coordinator="c:1"), "t") == ["/ip4/10.0.0.1/tcp/7000/p2p/QmCoordinator"]
    assert len(asked) == 2
    with pytest.raises(ValueError, match="give --coordinator"):
        swarm_peers(args(), "t")
