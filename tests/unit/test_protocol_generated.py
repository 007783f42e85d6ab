"""The committed *_pb2 modules are exactly what protocol/generate.py produces from the
.proto sources (Flower's drift check): editing a .proto without regenerating fails here."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from pollinate.protocol import generate

PROTO_DIR = generate.PROTO_DIR


def _committed_generated() -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in PROTO_DIR.iterdir() if p.name.endswith(generate.GENERATED_SUFFIXES)
    }


def _tools_version_of_committed_code() -> str:
    text = (PROTO_DIR / "node_pb2_grpc.py").read_text()
    match = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", text)
    assert match, "node_pb2_grpc.py carries no GRPC_GENERATED_VERSION stamp"
    return match.group(1)


def test_every_proto_has_committed_modules():
    committed = _committed_generated()
    for proto in PROTO_DIR.glob("*.proto"):
        stem = proto.stem
        for suffix in generate.GENERATED_SUFFIXES:
            assert f"{stem}{suffix}" in committed, f"{stem}{suffix} missing: run python protocol/generate.py"


def test_regenerating_changes_nothing(tmp_path: Path):
    installed = importlib.metadata.version("grpcio-tools")
    committed_with = _tools_version_of_committed_code()
    if installed != committed_with:
        # Another protoc stamps another gencode version into every file, so bytes would
        # differ without any .proto change; pin grpcio-tools to compare meaningfully.
        pytest.skip(f"generated code was made with grpcio-tools {committed_with}, {installed} is installed")
    generate.generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = _committed_generated()
    assert sorted(fresh) == sorted(committed), "generated file set differs: run python protocol/generate.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} differ from their .proto: run python protocol/generate.py"


def test_generated_modules_import_with_package_paths():
    # The modules must import each other through pollinate.protocol.v1 (not a bare
    # `import common_pb2`), and pass protobuf's and grpc's runtime version guards.
    from pollinate.protocol.v1 import common_pb2, node_pb2, node_pb2_grpc

    assert node_pb2.DESCRIPTOR.package == "pollinate.v1"
    assert node_pb2.ForwardReply.DESCRIPTOR.fields_by_name["tensor"].message_type is common_pb2.Tensor.DESCRIPTOR
    assert hasattr(node_pb2_grpc, "NodeServicer") and hasattr(node_pb2_grpc, "add_NodeServicer_to_server")
    text = (PROTO_DIR / "node_pb2_grpc.py").read_text()
    assert "from pollinate.protocol.v1 import common_pb2" in text


def test_field_numbers_are_stable():
    # Renumbering a field silently breaks every peer on an older build; these are the
    # numbers v1 shipped with. Adding fields is fine; changing these is not.
    from pollinate.protocol.v1 import common_pb2, node_pb2

    def numbers(message) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(common_pb2.Tensor) == {
        "dtype": 1, "shape": 2, "codec": 3, "data": 4, "total_bytes": 5,
        "chunk_index": 6, "num_chunks": 7, "name": 8,
    }  # fmt: skip
    expected_subset = {
        node_pb2.ForwardRequest: {"header": 1, "tensor": 2},
        node_pb2.BackwardRequest: {"header": 1, "tensor": 2},
        node_pb2.InferenceOpen: {"session_id": 1, "max_length": 2, "job": 3, "reply_codec": 4, "blocks": 5},
        node_pb2.InferenceRequest: {"open": 1, "position": 2, "tensor": 3},
        node_pb2.InferenceReply: {"position": 1, "tensor": 2},
        node_pb2.ShardMessage: {
            "job": 1, "span": 2, "round": 3, "sender_id": 4, "shard_index": 5,
            "weight": 6, "kind": 7, "tensor": 8,
        },
        node_pb2.GetStateRequest: {"job": 1, "span": 2, "round": 3},
        node_pb2.GetStateReply: {"round": 1, "tensor": 2},
    }  # fmt: skip
    for message, expected in expected_subset.items():
        actual = numbers(message)
        for name, number in expected.items():
            assert actual.get(name) == number, f"{message.DESCRIPTOR.name}.{name} is {actual.get(name)}, was {number}"
