"""A swarm with TLS on its data plane (`pollinate coordinator --data-tls`): a coordinator and
two real node processes hosting the whole tiny model, one dialled directly and one through a
circuit relay (the coordinator's DHT peer; --reachability relay), each serving gRPC with the
certificate the coordinator (the swarm's CA) issued for its address and key. A client given only the
coordinator's address generates the local model's greedy tokens over TLS; a trainer trains
one job on both replicas until their DiLoCo round (ExchangeShard between the nodes, over
TLS) commits, both replicas equal to the coordinator's copy; a plaintext caller is refused
with an error that says why."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from procs import ProcGroup
from rounds_swarm import start_swarm

SERVING_CLIENT = str(Path(__file__).with_name("serving_client.py"))
ROUNDS_CLIENT = str(Path(__file__).with_name("rounds_client.py"))
TOKEN = "data-tls-token"
PROMPT = [1, 5, 9, 33, 70, 12, 8]
NEW_TOKENS = 6


async def plaintext_info(addresses: list[str]) -> list[Exception | None]:
    """What a plaintext Info call to each address raised (None: it was answered)."""
    from pollinate.protocol.channels import ChannelConfig, open_channel
    from pollinate.protocol.errors import translate_rpc_errors
    from pollinate.protocol.relay import dialer
    from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

    out = []
    try:
        for address in addresses:
            channel = open_channel(address, ChannelConfig(token=TOKEN))
            try:
                with translate_rpc_errors(peer=address):
                    await node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=10)
                out.append(None)
            except Exception as exc:
                out.append(exc)
            finally:
                await channel.close()
    finally:
        await dialer().close()  # the relayed address's libp2p daemon, before the loop ends
    return out


def test_a_data_tls_swarm_generates_trains_and_refuses_plaintext(tmp_path, tiny_model_dir, tiny_model_files,
                                                               tiny_cache_dir, tiny_reference_model):
    import torch

    from pollinate.client.cli_status import format_status
    from pollinate.coordinator.client import call_coordinator
    from pollinate.protocol.errors import PeerUnavailable
    from pollinate.protocol.v1 import coordinator_pb2

    expected = tiny_reference_model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS,
                                             min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(PROMPT):].tolist()
    with ProcGroup(tmp_path) as group:
        coord, nodes = start_swarm(group, tmp_path, tiny_model_dir, tiny_cache_dir, replicas=2, token=TOKEN,
                                   coordinator_args=("--data-tls",), node_args={1: ("--reachability", "relay")})
        assert [n.info["relayed"] for n in nodes] == [False, True]
        address = coord.info["grpc"]
        assert coord.info["data_tls"] is True
        status = asyncio.run(call_coordinator(address, TOKEN, "Status", coordinator_pb2.StatusRequest()))
        assert status.data_tls_ca_pem == (tmp_path / "coord-data" / "swarm-ca.pem").read_text()
        assert "data plane: TLS" in format_status(status, now=0)  # `pollinate status`
        identities = {m.identity for m in status.members}
        assert len(identities) == 2 and "" not in identities  # each node joined with its own key

        generated = subprocess.run(
            [sys.executable, SERVING_CLIENT, "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
             "--token", TOKEN, "--coordinator", address, "--prompt-ids", ",".join(map(str, PROMPT)),
             "--max-new-tokens", str(NEW_TOKENS)], capture_output=True, text=True, timeout=120)
        assert generated.returncode == 0, generated.stderr[-3000:] + group.dump_logs()
        assert json.loads(generated.stdout.strip().splitlines()[-1])["tokens"] == expected

        trained = subprocess.run(
            [sys.executable, ROUNDS_CLIENT, "--coordinator", address, "--token", TOKEN, "--data-tls",
             "--nodes", ",".join(n.info["address"] for n in nodes), "--steps", "2", "--round-steps", "2",
             "--no-overlap", "--expect-round", "1"], capture_output=True, text=True, timeout=120)
        assert trained.returncode == 0, trained.stderr[-3000:] + group.dump_logs()
        result = json.loads(trained.stdout.strip().splitlines()[-1])
        assert result["round"] == 1 and result["replicas_equal_coordinator"] == [True, True], result

        refused = asyncio.run(plaintext_info([n.info["address"] for n in nodes]))  # direct, relayed
        for exc in refused:
            assert isinstance(exc, PeerUnavailable) and "plaintext call to a TLS peer" in str(exc), refused
        assert all(n.alive() for n in nodes)
        logs = group.dump_logs(200)
    assert logs.count("(TLS, token required)") == 2, logs  # both nodes served TLS, nothing plaintext
    assert logs.count("committed here (attempt 1, group of 2)") == 2, logs  # the exchange ran between them
