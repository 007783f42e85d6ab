"""What a trainer makes of a node's Backward reply (client/trainer.py SwarmChain.backward_hop),
against a real gRPC server in-process that answers as a node would: the gradient, or the
adapter and the gradient of a spot-checked Backward (BackwardHeader.return_adapter). A node
from before return_adapter answers the gradient alone: the hop is then treated as a failed
check (AnsweredWrong, transient: backward() bans it and moves the micro-batch to another
replica), neither a fatal error for the trainer nor a check silently skipped, which a liar
could use to never be checked. The bytes received are counted under the tensors' own names,
so a check's adapter is not filed as gradient bytes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pollinate.client.spot_check import AnsweredWrong
from pollinate.client.trainer import SwarmChain, TrainConfig, _transient
from pollinate.client.routing import Hop, PeerSpan
from pollinate.protocol.channels import ChannelConfig, RpcServer, ServerConfig, open_channel
from pollinate.protocol.tensors import ADAPTER_FLAT, GRAD_INPUTS, encode_tensor
from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

HIDDEN = 8


class _Node(node_pb2_grpc.NodeServicer):
    """Backward answered as a node does; `old` answers as one from before return_adapter."""

    def __init__(self) -> None:
        self.old = False

    async def Backward(self, request_iterator, context):
        header = None
        async for request in request_iterator:
            if request.HasField("header"):
                header = request.header
        replies = [(torch.full((2, 3, HIDDEN), 0.5), GRAD_INPUTS)]
        if header.return_adapter and not self.old:
            replies.insert(0, (torch.arange(5, dtype=torch.float32), ADAPTER_FLAT))
        for tensor, name in replies:
            for chunk in encode_tensor(tensor, name=name).chunks():
                yield node_pb2.BackwardReply(tensor=chunk)


async def test_backward_replies_with_and_without_the_adapter():
    node = _Node()
    server = RpcServer(ServerConfig())
    server.add(node_pb2_grpc.add_NodeServicer_to_server, node)
    await server.start()
    channel = open_channel(server.address, ChannelConfig())
    try:
        swarm = SimpleNamespace(stub=lambda address: node_pb2_grpc.NodeStub(channel))
        chain = SwarmChain(swarm, TrainConfig(job="j"), timeout_s=10)
        hop = Hop(peer=PeerSpan(peer_id="p", address=server.address, start=2, end=4, throughput=1.0), start=2, end=4)
        hidden, grad = torch.zeros(2, 3, HIDDEN), torch.ones(2, 3, HIDDEN)

        plain = await chain.backward_hop(hop, hidden, grad)
        assert torch.equal(plain, torch.full((2, 3, HIDDEN), 0.5))
        flat, checked = await chain.backward_hop(hop, hidden, grad, return_adapter=True)
        assert torch.equal(flat, torch.arange(5, dtype=torch.float32)) and torch.equal(checked, plain)
        kinds = chain.bytes_by_kind
        size = {name: len(encode_tensor(t, name=name).payload) for t, name in (
            (flat, ADAPTER_FLAT), (plain, GRAD_INPUTS))}
        assert kinds["Backward adapter.flat received"] == size[ADAPTER_FLAT]  # the adapter, under its own name
        assert kinds["Backward grad_inputs received"] == 2 * size[GRAD_INPUTS]  # two gradients, nothing else
        assert chain.bytes_received == kinds["Backward adapter.flat received"] + kinds["Backward grad_inputs received"]

        node.old = True
        with pytest.raises(AnsweredWrong, match="without its adapter") as caught:
            await chain.backward_hop(hop, hidden, grad, return_adapter=True)
        assert _transient(caught.value)  # the hop moves to another replica; training goes on
        assert torch.equal(await chain.backward_hop(hop, hidden, grad), plain)  # unchecked Backwards as before
    finally:
        await channel.close()
        await server.stop(0)
