"""Hostile input against a real node and coordinator: every RPC, and the status page.

    python benchmarks/fuzz.py [--quick] [--messages N] [--model smollm2] [--seed S]

Starts a coordinator (token, status page) and one node that joins it, then, service by
service (node, coordinator, http), sends N messages (10,000; --quick 1,000) and prints one
JSON object per service:

    service, messages, calls, crashes, hangs, internal_or_unknown, rss_growth_mb, log_bytes,
    valid_answer_unchanged, codes, examples

What is sent, per gRPC method of the service's descriptor (protocol/v1):
- structured: messages of the method's request type drawn by hypothesis from the descriptor
  (every field, nested messages, repeated fields; integers at their extremes, NaN and
  infinities, strings with newlines and 20 kB, bytes up to 64 kB);
- mutated: the method's valid request with flipped bits, truncated, spliced or padded with
  over-long varints, so a parser gets past the first bytes before it meets the damage;
- raw: random bytes of 0 B to 64 kB;
- attacks: the cases issue 18 found (a cocktail tensor that expands to 2^26 elements,
  shards of rounds that never formed, job specs with NaN or rank 2^32-1, a forged commit,
  a Join with another node's address, names with newlines);
and one call in ten carries no token or a wrong one. Joins other than raw bytes are signed by
one harness key, as the coordinator requires (raw-byte Joins go unsigned and are refused).
Streaming methods get one to three messages per call. The HTTP service gets random methods, paths, queries, headers, request
lines and raw bytes on the status page's port.

What counts: `crashes`, 1 when the process is gone at the end; `hangs`, calls that got no
answer within --deadline-s; `internal_or_unknown`, answers with status INTERNAL or UNKNOWN (HTTP:
5xx, or a connection closed without a status line); `rss_growth_mb`, the peak resident
memory of the process while fuzzing minus its value before; `log_bytes`, what its log grew
by; `valid_answer_unchanged`, whether a fixed valid request (node: a Forward of a fixed
input; coordinator: GetJob of a job made before; http: that job's JSON) gets the same bytes
after as before. `examples` holds a few INTERNAL/UNKNOWN/5xx answers to start debugging from.
Targets (issue 18): >= 10,000 messages per service, 0 crashes, 0 hangs, 0 INTERNAL/UNKNOWN,
RSS growth < 100 MB, log bytes < 1 MB.

Network safety: fields that name an address a server may dial (Join.address,
CheckReachable.address, relay multiaddrs) only ever hold loopback addresses here, also after
mutation: the harness sends traffic to loopback only.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))  # procs (the shared process helper)

from procs import Proc, ProcGroup  # noqa: E402

from pollinate.protocol.auth import TOKEN_METADATA_KEY  # noqa: E402
from pollinate.protocol.identity import NodeIdentity  # noqa: E402
from pollinate.protocol.pieces import to_pieces  # noqa: E402
from pollinate.protocol.v1 import common_pb2, coordinator_pb2, node_pb2  # noqa: E402

TOKEN = "fuzz-token"
JOB = "fuzz-job"
MAX_MESSAGE = 64 * 1024 * 1024
EXAMPLES_KEPT = 5
# Addresses an attacker may name; all loopback, so nothing leaves this machine.
LOCAL_ADDRESSES = ["", "127.0.0.1:1", "127.0.0.1:65535", "[::1]:0", "localhost:99999", "127.0.0.1",
                   ":", "127.0.0.1:-1", "127.0.0.1:0\n127.0.0.1:1", "/ip4/127.0.0.1/tcp/1"]
ADDRESS_FIELDS = ("address", "relay_maddr")


# ---- the processes -------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssPeak:
    """The peak RSS of a process, sampled every 50 ms on a thread while in the `with`."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self):
        self.before = rss_bytes(self.pid)
        self.peak = self.before
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 2**20


# ---- messages --------------------------------------------------------------------------------

def message_class(descriptor):
    return message_factory.GetMessageClass(descriptor)


def sanitise(msg) -> None:
    """Point every dialable address field of `msg` (recursively) at loopback."""
    for fd, value in list(msg.ListFields()):
        if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            continue  # a map of scalars (trained_steps): no address in it
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for sub in (value if fd.is_repeated else [value]):
                sanitise(sub)
        elif fd.name in ADDRESS_FIELDS and fd.type == FieldDescriptor.TYPE_STRING:
            if fd.is_repeated:
                value[:] = [_local(v) for v in value]
            else:
                setattr(msg, fd.name, _local(value))


def _local(address: str) -> str:
    """`address` if it is one of ours, else a loopback one picked by its length (no randomness
    of its own: hypothesis wants its strategies deterministic)."""
    return address if address in LOCAL_ADDRESSES else LOCAL_ADDRESSES[len(address) % len(LOCAL_ADDRESSES)]


def safe_bytes(cls, payload: bytes) -> bytes:
    """`payload` as sent: unchanged when it does not parse as `cls` (the server refuses it
    before reading any address) or names no address; re-serialised with loopback addresses
    otherwise."""
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except Exception:
        return payload
    before = msg.SerializeToString()
    sanitise(msg)
    after = msg.SerializeToString()
    return payload if after == before else after


def strategy_for(descriptor, depth: int = 0):
    """A hypothesis strategy of messages of `descriptor`, every field optional."""
    from hypothesis import strategies as st

    fields = {}
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value = strategy_for(fd.message_type, depth + 1)
        else:
            value = _scalar(fd, st)
        fields[fd.name] = st.lists(value, max_size=4) if fd.is_repeated else value
    cls = message_class(descriptor)

    def build(values: dict):
        msg = cls()
        for name, value in values.items():
            fd = descriptor.fields_by_name[name]
            try:
                if fd.is_repeated:
                    if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
                        for v in value:  # a map<K, V>: its entries as drawn (scalar values)
                            getattr(msg, name)[v.key] = v.value
                    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                        for v in value:
                            getattr(msg, name).add().CopyFrom(v)
                    else:
                        getattr(msg, name).extend(value)
                elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                    getattr(msg, name).CopyFrom(value)
                else:
                    setattr(msg, name, value)
            except (ValueError, TypeError):  # e.g. a lone surrogate in a string: leave the field out
                continue
        sanitise(msg)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


def _scalar(fd, st):
    t = fd.type
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32,
             FieldDescriptor.TYPE_ENUM):
        return st.integers(-2**31, 2**31 - 1)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.integers(-2**63, 2**63 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if t == FieldDescriptor.TYPE_DOUBLE else 32)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.sampled_from(
            ["none", "fp16", "int8row", "cocktail", "float32", "float16", "lora", "hidden_states",
             "a\nforged: log line", "x" * 20_000, "../../etc/passwd", JOB, "q_proj"]))
    return st.one_of(st.binary(max_size=256), st.sampled_from([b"\0" * 65_536, b"\xff" * 4096]))


def mutate(payload: bytes, rng: random.Random) -> bytes:
    data = bytearray(payload)
    how = rng.randrange(5)
    if how == 0 and data:  # flip a few bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif how == 1 and data:  # truncate
        del data[rng.randrange(len(data)):]
    elif how == 2:  # an over-long varint (a field key or a length) somewhere
        i = rng.randint(0, len(data))
        data[i:i] = b"\xff" * rng.randint(1, 11)
    elif how == 3 and data:  # splice a piece of itself
        i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
        k = rng.randint(0, len(data))
        data[k:k] = data[i:j] * rng.randint(1, 4)
    else:  # a huge length prefix for a field
        i = rng.randint(0, len(data))
        data[i:i] = bytes([0x22]) + b"\xff\xff\xff\xff\x0f"
    return bytes(data)


# ---- gRPC calls ------------------------------------------------------------------------------

@dataclass
class Call:
    method: str  # /pollinate.v1.Node/Forward
    payloads: list[bytes]
    token: str | None = TOKEN
    kind: str = ""  # structured, mutated, raw, attack
    # Signs the call, at send time, as a member's key does (protocol/identity.py); None: unsigned
    signer: NodeIdentity | None = None


@dataclass
class Tally:
    messages: int = 0
    calls: int = 0
    hangs: int = 0
    internal_or_unknown: int = 0
    codes: Counter = field(default_factory=Counter)
    attacks: Counter = field(default_factory=Counter)  # "Method CODE" of the attack calls
    examples: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, what: str, code: str, detail: str, messages: int) -> None:
        with self.lock:
            self.calls += 1
            self.messages += messages
            self.codes[code] += 1
            if what.startswith("attack "):
                self.attacks[f"{what.rsplit('/', 1)[-1]} {code}"] += 1
            if code in ("DEADLINE_EXCEEDED", "HANG"):
                self.hangs += 1
            if code in ("INTERNAL", "UNKNOWN", "HTTP_5XX", "HTTP_NO_STATUS"):
                self.internal_or_unknown += 1
                if len(self.examples) < EXAMPLES_KEPT:
                    self.examples.append({"call": what, "code": code, "detail": detail[:300]})


class Rpc:
    """Raw-bytes calls to one server: no serialiser on our side, so anything can be sent."""

    def __init__(self, address: str, methods: dict[str, object], deadline_s: float):
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)])
        self.methods = methods  # full name -> method descriptor
        self.deadline_s = deadline_s

    def call(self, call: Call) -> tuple[str, str, list[bytes]]:
        m = self.methods[call.method]
        metadata = ((TOKEN_METADATA_KEY, call.token),) if call.token is not None else ()
        if call.signer is not None:
            metadata += self._signature(call, m)
        try:
            if m.client_streaming:
                fn = (self.channel.stream_stream if m.server_streaming else self.channel.stream_unary)(call.method)
                replies = fn(iter(call.payloads), timeout=self.deadline_s, metadata=metadata)
            else:
                fn = (self.channel.unary_stream if m.server_streaming else self.channel.unary_unary)(call.method)
                replies = fn(call.payloads[0], timeout=self.deadline_s, metadata=metadata)
            replies = list(replies) if m.server_streaming else [replies]
            return "OK", "", replies
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", []

    @staticmethod
    def _signature(call: Call, m) -> tuple[tuple[str, str], ...]:
        """The signer's signature of the call as the server will see it: of the request it
        parses (no signature for bytes that do not parse: those are refused before it matters)."""
        request = None
        if not m.client_streaming:  # a stream's signature covers no message
            try:
                request = message_class(m.input_type).FromString(call.payloads[0])
            except Exception:
                return ()
        return call.signer.call_metadata(call.method, request)

    def close(self) -> None:
        self.channel.close()


def methods_of(service_descriptor) -> dict[str, object]:
    return {f"/{service_descriptor.full_name}/{m.name}": m for m in service_descriptor.methods}


def structured_calls(methods: dict, n: int, seed: int) -> list[Call]:
    """About n calls spread over the methods, each message drawn by hypothesis."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    calls: list[Call] = []
    per_method = max(1, n // len(methods))
    for name, m in methods.items():
        drawn = strategy_for(m.input_type)
        batch = st.lists(drawn, min_size=1, max_size=3) if m.client_streaming else st.tuples(drawn)

        @hseed(seed)
        @settings(max_examples=per_method, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(batch)
        def draw(msgs):
            calls.append(Call(name, [msg.SerializeToString() for msg in msgs], kind="structured"))

        draw()
    return calls


def mutated_and_raw_calls(methods: dict, seeds: dict[str, list[bytes]], n_mutated: int, n_raw: int,
                          rng: random.Random) -> list[Call]:
    calls = []
    names = list(methods)
    for i in range(n_mutated + n_raw):
        name = names[i % len(names)]
        m = methods[name]
        cls = message_class(m.input_type)
        count = rng.randint(1, 3) if m.client_streaming else 1
        if i < n_mutated:
            base = seeds.get(name) or [b""]
            payloads = [safe_bytes(cls, mutate(rng.choice(base), rng)) for _ in range(count)]
            calls.append(Call(name, payloads, kind="mutated"))
        else:
            size = rng.choice([0, 1, 2, 7, 64, 512, 4096, 65_536])
            calls.append(Call(name, [safe_bytes(cls, rng.randbytes(size)) for _ in range(count)], kind="raw"))
    return calls


def spoil_tokens(calls: list[Call], rng: random.Random) -> None:
    """One call in ten without a token or with a wrong one."""
    for c in calls:
        r = rng.random()
        if r < 0.05:
            c.token = None
        elif r < 0.1:
            c.token = rng.choice(["", "fuzz-toke", TOKEN + "x", "~" * 4000, TOKEN.upper()])  # gRPC sends printable ASCII only


def run_calls(rpc: Rpc, calls: list[Call], tally: Tally, workers: int = 8) -> None:
    def one(c: Call):
        code, detail, _ = rpc.call(c)
        tally.record(f"{c.kind} {c.method}", code, detail, len(c.payloads))

    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(one, calls):
            pass


# ---- what each service is sent ----------------------------------------------------------------

def job_spec(**changes) -> node_pb2.JobSpec:
    """A valid LoRA spec with `changes` applied (lists replace the repeated field)."""
    spec = node_pb2.JobSpec(method="lora", rank=4, alpha=8.0, targets=["q_proj"], lr=1e-3, micro_batches=1)
    for k, v in changes.items():
        if isinstance(v, list):
            getattr(spec, k)[:] = v
        else:
            setattr(spec, k, v)
    return spec


def tensor_chunks(values, codec: str = "none") -> list[bytes]:
    from pollinate.protocol.tensors import encode_tensor

    return [c.SerializeToString() for c in encode_tensor(values, codec=codec, name="hidden_states").chunks()]


def tensor_message(tensor: common_pb2.Tensor, wrap) -> bytes:
    return wrap(tensor=tensor).SerializeToString()


def node_seeds(hidden_size: int, node_info: dict) -> dict[str, list[bytes]]:
    """Valid requests of every Node method: what the mutations start from."""
    import torch

    x = torch.randn(1, 4, hidden_size, generator=torch.Generator().manual_seed(0))
    chunks = [common_pb2.Tensor.FromString(c) for c in tensor_chunks(x)]
    spec = job_spec()
    fwd = [node_pb2.ForwardRequest(header=node_pb2.ForwardHeader(job=JOB, spec=spec)).SerializeToString()]
    fwd += [node_pb2.ForwardRequest(tensor=c).SerializeToString() for c in chunks]
    bwd = [node_pb2.BackwardRequest(header=node_pb2.BackwardHeader(job=JOB, spec=spec)).SerializeToString()]
    bwd += [node_pb2.BackwardRequest(tensor=c).SerializeToString() for c in chunks] * 2
    inf = [node_pb2.InferenceRequest(open=node_pb2.InferenceOpen(session_id="s", max_length=16)).SerializeToString()]
    inf += [node_pb2.InferenceRequest(position=0, tensor=c).SerializeToString() for c in chunks]
    shard = node_pb2.ShardMessage(job=JOB, span=common_pb2.Span(start=node_info["blocks"][0], end=node_info["blocks"][1]),
                                  round=1, sender_id="m-1", shard_index=0, weight=1, tensor=chunks[0])
    return {
        "/pollinate.v1.Node/Health": [common_pb2.HealthRequest().SerializeToString()],
        "/pollinate.v1.Node/Info": [node_pb2.InfoRequest().SerializeToString()],
        "/pollinate.v1.Node/Forward": fwd,
        "/pollinate.v1.Node/Backward": bwd,
        "/pollinate.v1.Node/Inference": inf,
        "/pollinate.v1.Node/ExchangeShard": [shard.SerializeToString()],
        "/pollinate.v1.Node/GetState": [node_pb2.GetStateRequest(job=JOB, round=1).SerializeToString()],
    }


def node_attacks(hidden_size: int, node_info: dict, rng: random.Random) -> list[Call]:
    """Issue 18's cases 1-3 and 5 against the node."""
    import zstandard

    calls = []
    # 1: a tiny cocktail tensor whose header promises [1, 2^20, 64] and a 2^26-position bitmap
    bomb = common_pb2.Tensor(dtype="float32", shape=[1, 2**20, 64], codec="cocktail", name="hidden_states",
                             data=zstandard.ZstdCompressor().compress(b"\0" * (2**26 // 8)), total_bytes=0,
                             num_chunks=1)
    for codec in ("cocktail", "int8row", "fp16", "none"):
        t = common_pb2.Tensor()
        t.CopyFrom(bomb)
        t.codec = codec
        calls.append(Call("/pollinate.v1.Node/Forward", [node_pb2.ForwardRequest(
            header=node_pb2.ForwardHeader()).SerializeToString(), tensor_message(t, node_pb2.ForwardRequest)],
            kind="attack"))
    # 2: shards for rounds that never formed, up to 2^64-1, each 1 MiB
    import torch

    big = common_pb2.Tensor.FromString(tensor_chunks(torch.zeros(256 * 1024))[0])
    for r in [2, 3, 10**6, 2**64 - 1] + [rng.randrange(2**64) for _ in range(12)]:
        calls.append(Call("/pollinate.v1.Node/ExchangeShard", [node_pb2.ShardMessage(
            job=JOB, span=common_pb2.Span(start=node_info["blocks"][0], end=node_info["blocks"][1]), round=r,
            sender_id="intruder", shard_index=0, weight=1, tensor=big).SerializeToString()], kind="attack"))
    # 3: job specs out of range, each under a new name
    x = common_pb2.Tensor.FromString(tensor_chunks(torch.zeros(1, 2, hidden_size))[0])
    bad_specs = [dict(rank=100_000), dict(rank=2**32 - 1), dict(alpha=float("inf")), dict(lr=float("inf")),
                 dict(grad_clip=float("nan")), dict(targets=["q_proj"] * 10_000), dict(codec="bogus"),
                 dict(codec="cocktail", codec_p=5.0), dict(method="a\nb")]
    for i, bad in enumerate(bad_specs):
        calls.append(Call("/pollinate.v1.Node/Forward", [
            node_pb2.ForwardRequest(header=node_pb2.ForwardHeader(job=f"bad-spec-{i}", spec=job_spec(**bad))
                                    ).SerializeToString(),
            tensor_message(x, node_pb2.ForwardRequest)], kind="attack"))
    # streams of a tensor over what the node serves: 256 MiB of hidden states (every RPC that
    # takes activations), a 512 MiB contribution; refused at the first chunk, before the rest is kept
    seq = (256 << 20) // (2 * hidden_size)
    chunks = [common_pb2.Tensor(dtype="float16", shape=[1, seq, hidden_size], codec="none", name="hidden_states",
                                data=bytes(1 << 20), total_bytes=256 << 20, chunk_index=i, num_chunks=256)
              for i in range(8)]
    calls.append(Call("/pollinate.v1.Node/Forward", [node_pb2.ForwardRequest(
        header=node_pb2.ForwardHeader()).SerializeToString()] + [tensor_message(c, node_pb2.ForwardRequest)
                                                                  for c in chunks], kind="attack"))
    calls.append(Call("/pollinate.v1.Node/Inference", [node_pb2.InferenceRequest(
        open=node_pb2.InferenceOpen(session_id="big", max_length=64)).SerializeToString()] + [
        node_pb2.InferenceRequest(position=0, tensor=c).SerializeToString() for c in chunks], kind="attack"))
    calls.append(Call("/pollinate.v1.Node/Backward", [node_pb2.BackwardRequest(header=node_pb2.BackwardHeader(
        job=JOB, spec=job_spec())).SerializeToString()] + [node_pb2.BackwardRequest(tensor=c).SerializeToString()
                                                           for c in chunks], kind="attack"))
    calls.append(Call("/pollinate.v1.Node/ExchangeShard", [node_pb2.ShardMessage(
        job=JOB, span=common_pb2.Span(start=node_info["blocks"][0], end=node_info["blocks"][1]), round=2,
        sender_id="intruder", shard_index=0, weight=1, tensor=common_pb2.Tensor(
            dtype="float32", shape=[2**27], codec="none", data=bytes(1 << 20), total_bytes=512 << 20, num_chunks=512)
    ).SerializeToString()], kind="attack"))
    # 5: many held sessions, each asking for a long cache
    for i in range(8):
        calls.append(Call("/pollinate.v1.Node/Inference", [node_pb2.InferenceRequest(
            open=node_pb2.InferenceOpen(session_id=f"hog-{i}\n", max_length=2**31)).SerializeToString(),
            node_pb2.InferenceRequest(position=0, tensor=x).SerializeToString()], kind="attack"))
    return calls


def signed_forward(node_info: dict, hidden_size: int) -> node_pb2.AnswerEvidence:
    """The node's signed answer to one Forward (protocol/answers.py), as a client keeps it:
    what a liar report carries."""
    import torch

    from pollinate.protocol.answers import Transcript
    from pollinate.protocol.tensors import TensorAssembler, encode_tensor

    x = encode_tensor(torch.randn(1, 3, hidden_size, generator=torch.Generator().manual_seed(2)), codec="fp16",
                      name="hidden_states")
    rpc = Rpc(node_info["address"], methods_of(node_pb2.DESCRIPTOR.services_by_name["Node"]), 60)
    code, detail, replies = rpc.call(Call("/pollinate.v1.Node/Forward", [
        node_pb2.ForwardRequest(header=node_pb2.ForwardHeader(reply_codec="fp16")).SerializeToString(),
        *(node_pb2.ForwardRequest(tensor=c).SerializeToString() for c in x.chunks())]))
    rpc.close()
    if code != "OK":
        raise RuntimeError(f"a signed Forward for the liar-report attacks failed: {code} {detail}")
    assembler, answer, signature = TensorAssembler(), None, None
    for raw in replies:
        reply = node_pb2.ForwardReply.FromString(raw)
        answer = assembler.feed(reply.tensor) or answer
        signature = reply.signature if reply.HasField("signature") else signature
    transcript = Transcript("forward", job="", start=node_info["blocks"][0], end=node_info["blocks"][1])
    transcript.record(0, [x, answer], signature)
    evidence = transcript.evidence()
    if evidence is None:
        raise RuntimeError("the node did not sign its Forward answer")
    return evidence


def coordinator_seeds(node_info: dict, evidence: node_pb2.AnswerEvidence) -> dict[str, list[bytes]]:
    spec = job_spec()
    span = common_pb2.Span(start=node_info["blocks"][0], end=node_info["blocks"][1])
    c = coordinator_pb2
    return {
        "/pollinate.v1.Coordinator/Health": [common_pb2.HealthRequest().SerializeToString()],
        "/pollinate.v1.Coordinator/Join": [c.JoinRequest(address="127.0.0.1:1", model_id="m", capacity_blocks=2,
                                                          throughput=1.0, name="n").SerializeToString()],
        "/pollinate.v1.Coordinator/Heartbeat": [c.HeartbeatRequest(member_id="m-1", throughput=1.0).SerializeToString()],
        "/pollinate.v1.Coordinator/HeartbeatStream": [c.HeartbeatRequest(member_id="m-1").SerializeToString()],
        "/pollinate.v1.Coordinator/Leave": [c.LeaveRequest(member_id="m-1").SerializeToString()],
        "/pollinate.v1.Coordinator/Status": [c.StatusRequest().SerializeToString()],
        "/pollinate.v1.Coordinator/BeginRound": [c.BeginRoundRequest(job=JOB, span=span, round=1, member_id="m-1",
                                                                      tokens=10).SerializeToString()],
        "/pollinate.v1.Coordinator/CommitRound": [c.CommitRoundRequest(job=JOB, span=span, round=1, member_id="m-1",
                                                                        checksum="0" * 64, state=b"x").SerializeToString()],
        "/pollinate.v1.Coordinator/GetCommittedState": [c.GetCommittedStateRequest(job=JOB, span=span).SerializeToString()],
        "/pollinate.v1.Coordinator/CreateJob": [c.CreateJobRequest(name="j", spec=spec).SerializeToString()],
        "/pollinate.v1.Coordinator/GetJob": [c.GetJobRequest(name=JOB).SerializeToString()],
        "/pollinate.v1.Coordinator/ListJobs": [c.ListJobsRequest().SerializeToString()],
        "/pollinate.v1.Coordinator/CheckReachable": [c.CheckReachableRequest(address="127.0.0.1:1").SerializeToString()],
        "/pollinate.v1.Coordinator/ReportTraining": [c.ReportTrainingRequest(
            job=JOB, trainer_id="t1", step=3, tokens=100, train_loss=2.5).SerializeToString()],
        "/pollinate.v1.Coordinator/GetJobHistory": [c.GetJobHistoryRequest(name=JOB).SerializeToString()],
        "/pollinate.v1.Coordinator/ReportAnalysis": [c.ReportAnalysisRequest(job=JOB).SerializeToString()],
        "/pollinate.v1.Coordinator/ReportLiar": [c.ReportLiarRequest(
            address=node_info["address"], blocks=span, distance=0.5, tolerance=0.03,
            evidence=evidence).SerializeToString()],
        "/pollinate.v1.Coordinator/ListQuarantined": [c.ListQuarantinedRequest().SerializeToString()],
        "/pollinate.v1.Coordinator/IssueDataTlsCertificate": [c.DataTlsCertificateRequest(
            member_id="m-1", address=node_info["address"]).SerializeToString()],
        "/pollinate.v1.Coordinator/CommitRoundInPieces": [p.SerializeToString() for p in to_pieces(
            c.CommitRoundRequest(job=JOB, span=span, round=1, member_id="m-1", checksum="0" * 64, state=b"x" * 3000))],
        "/pollinate.v1.Coordinator/ReportLiarInPieces": [p.SerializeToString() for p in to_pieces(
            c.ReportLiarRequest(address=node_info["address"], blocks=span, distance=0.5, tolerance=0.03,
                                evidence=evidence))],
        "/pollinate.v1.Coordinator/GetCommittedStateInPieces": [
            c.GetCommittedStateRequest(job=JOB, span=span).SerializeToString()],
    }


def coordinator_attacks(node_info: dict, evidence: node_pb2.AnswerEvidence, rng: random.Random) -> list[Call]:
    import zstandard

    from pollinate.protocol.answers import MAX_EVIDENCE_STEPS, AnswerSigner, read_evidence

    c = coordinator_pb2
    span = common_pb2.Span(start=node_info["blocks"][0], end=node_info["blocks"][1])
    calls = []
    # liar reports of the node with its signed answer spoilt, each refused before anything is
    # decoded or re-run: blocks it did not sign, an answer that is a pseudo-gradient codec's
    # 2^26-element bomb, a shape its bytes cannot hold, more steps than allowed, another key's
    # signature over the same transcript
    def spoilt(change) -> Call:
        ev = node_pb2.AnswerEvidence()
        ev.CopyFrom(evidence)
        change(ev)
        return Call("/pollinate.v1.Coordinator/ReportLiar", [c.ReportLiarRequest(
            address=node_info["address"], blocks=span, distance=0.5, tolerance=0.03, evidence=ev).SerializeToString()],
            kind="attack")

    def bomb(ev):
        t = ev.steps[0].tensors[1]
        t.codec, t.shape[:] = "cocktail", [1, 2**20, 64]
        t.data = zstandard.ZstdCompressor().compress(b"\0" * (2**26 // 8))

    def many_steps(ev):  # empty ones: the count is the attack, not the bytes
        for _ in range(MAX_EVIDENCE_STEPS):
            ev.steps.add(position=1)

    def other_key(ev):  # the same transcript, well signed, by a key that is not the member's
        signer = AnswerSigner(NodeIdentity.generate(), "forward", job="", start=span.start, end=span.end)
        (position, tensors), = read_evidence(ev)
        signed = signer.sign(position, tensors)
        ev.nonce, ev.signature = signed.nonce, signed.signature

    calls += [spoilt(lambda ev: setattr(ev.blocks, "end", ev.blocks.end + 1)), spoilt(bomb),
              spoilt(lambda ev: ev.steps[0].tensors[1].shape.extend([2**20])), spoilt(many_steps), spoilt(other_key)]
    # large requests: a 60 MiB state in one message (refused by gRPC before it is read), and in
    # pieces a size over the limit, or far more declared than sent
    calls.append(Call("/pollinate.v1.Coordinator/CommitRound", [c.CommitRoundRequest(
        job=JOB, span=span, round=1, member_id="intruder", checksum="0" * 64, state=bytes(60 << 20)).SerializeToString()],
        kind="attack"))
    for method, total in (("CommitRoundInPieces", 2**63), ("ReportLiarInPieces", 2**30), ("CommitRoundInPieces", 64 << 20)):
        calls.append(Call(f"/pollinate.v1.Coordinator/{method}", [c.Piece(total_bytes=total, data=b"\x0a").SerializeToString()],
                          kind="attack"))
    # 3: job specs out of range, and a 1.2 MB targets list
    for i, bad in enumerate([dict(rank=2**32 - 1), dict(lr=float("nan")), dict(codec="bogus"), dict(codec_p=5.0),
                             dict(targets=["t" * 60] * 20_000), dict(method="lora\nforged")]):
        calls.append(Call("/pollinate.v1.Coordinator/CreateJob", [c.CreateJobRequest(
            name=f"bad-{i}", spec=job_spec(**bad)).SerializeToString()], kind="attack"))
    # 5: a Join claiming the real node's address; 6: a name that forges a log line
    calls.append(Call("/pollinate.v1.Coordinator/Join", [c.JoinRequest(
        address=node_info["address"], model_id="", capacity_blocks=2, throughput=1e9,
        name="evil\n2026-01-01 INFO forged").SerializeToString()], kind="attack"))
    # 4: a newcomer begins a round of the fuzz job for the node's span and commits garbage
    for r in (1, 2, 2**64 - 1):
        calls.append(Call("/pollinate.v1.Coordinator/BeginRound", [c.BeginRoundRequest(
            job=JOB, span=span, round=r, member_id="intruder", tokens=2**63).SerializeToString()], kind="attack"))
        calls.append(Call("/pollinate.v1.Coordinator/CommitRound", [c.CommitRoundRequest(
            job=JOB, span=span, round=r, member_id="intruder", checksum="0" * 64,
            state=b"this is not safetensors").SerializeToString()], kind="attack"))
    return calls


def http_requests(n: int, rng: random.Random) -> list[bytes]:
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "G\x00T", "get", "x" * 300]
    paths = ["/", "/index.html", "/metrics", "/healthz", "/api/v1/status", f"/api/v1/jobs/{JOB}", f"/jobs/{JOB}",
             "/nodes/", "/api/v1/jobs/", "/jobs/%00", "/nodes/%0a%0d", "/..%2f..%2fetc/passwd", "//", "*",
             "/" + "a" * 70_000, "/jobs/<script>alert(1)</script>", "/?fragment", "/jobs/x?fragment&fragment"]
    versions = ["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/9.9", "", "HTTP/1.1 extra"]
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.15:
            out.append(rng.randbytes(rng.choice([0, 1, 16, 1024, 70_000])))
            continue
        path = rng.choice(paths)
        if rng.random() < 0.3:
            path += "?" + "&".join(f"{rng.randbytes(3).hex()}={rng.randbytes(2).hex()}" for _ in range(rng.randint(1, 5)))
        line = f"{rng.choice(methods)} {path} {rng.choice(versions)}".strip()
        headers = ["Host: fuzz"]
        if rng.random() < 0.3:
            headers += [f"X-{j}: {'v' * rng.choice([1, 100, 8000])}" for j in range(rng.randint(1, 20))]
        if rng.random() < 0.2:
            headers.append(f"Content-Length: {rng.choice([0, 5, 10**12, -1])}")
        body = rng.randbytes(rng.choice([0, 0, 10, 5000]))
        text = (line + "\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode("latin-1", "replace") + body
        if rng.random() < 0.1:  # the head cut short: the server must give up, not wait forever
            text = text[: rng.randrange(len(text))]
        out.append(text)
    return out


def http_call(address: str, raw: bytes, deadline_s: float) -> tuple[str, bytes]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=deadline_s) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed first (a bad head): what it answered is still readable
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        except socket.timeout:
            return "HANG", answer
    if not answer:
        # No status line at all: fine for a request the server could not even read as HTTP
        # (it closes without answering); the harness only counts it against requests that
        # completed their head.
        return "CLOSED", answer
    parts = answer.split(b" ", 2)
    code = parts[1].decode("latin-1", "replace") if len(parts) > 1 else "?"
    return ("HTTP_5XX" if code.startswith("5") else f"HTTP_{code}"), answer


def http_body(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[-1]


# ---- one service ---------------------------------------------------------------------------

def fuzz_grpc(name: str, proc: Proc, address: str, service_descriptor, seeds: dict, attacks: list[Call],
              valid: Call, n: int, rng: random.Random, seed: int, deadline_s: float) -> dict:
    methods = methods_of(service_descriptor)
    rpc = Rpc(address, methods, deadline_s)
    n_attack = len(attacks)
    n_struct = int(0.45 * (n - n_attack))
    n_mut = int(0.4 * (n - n_attack))
    # Streaming calls carry about two messages each: count messages, not calls, against n.
    calls = structured_calls(methods, n_struct, seed)
    calls += mutated_and_raw_calls(methods, seeds, n_mut, 0, rng)
    calls += attacks
    sent = sum(len(c.payloads) for c in calls)
    raw = []
    while sent + sum(len(c.payloads) for c in raw) < n:
        raw += mutated_and_raw_calls(methods, seeds, 0, 64, rng)
    calls += raw
    # Joins must be signed (issue 18): all but the raw bytes are, to reach past the check, by one
    # key joining at many addresses (as a Sybil with one identity would)
    signer = NodeIdentity.generate()
    for c in calls:
        if c.method.endswith("/Join") and c.kind != "raw":
            c.signer = signer
    spoil_tokens(calls, rng)
    rng.shuffle(calls)

    code, detail, before = rpc.call(valid)
    if code != "OK":
        raise RuntimeError(f"{name}: the valid request failed before fuzzing: {code} {detail}")
    log_before = proc.log_path.stat().st_size
    tally = Tally()
    started = time.monotonic()
    with RssPeak(proc.pid) as rss:
        run_calls(rpc, calls, tally)
    seconds = time.monotonic() - started
    code, detail, after = rpc.call(valid)
    rpc.close()
    unchanged = _unsigned(rpc, valid, before) == _unsigned(rpc, valid, after) and code == "OK"
    return summary(name, tally, proc, rss, log_before, unchanged, seconds)


def _unsigned(rpc, call, replies: list[bytes]) -> list[bytes]:
    """`replies` without the node's signatures (protocol/answers.py): each answer's is fresh
    (its nonce and ECDSA's randomness), what it signs is what must not change."""
    cls = message_class(rpc.methods[call.method].output_type)
    out = []
    for raw in replies:
        msg = cls.FromString(raw)
        if "signature" in msg.DESCRIPTOR.fields_by_name:
            msg.ClearField("signature")
        out.append(msg.SerializeToString(deterministic=True))
    return out


def fuzz_http(proc: Proc, address: str, n: int, rng: random.Random, deadline_s: float) -> dict:
    valid = f"GET /api/v1/jobs/{JOB} HTTP/1.1\r\nHost: fuzz\r\n\r\n".encode()

    def job_json():
        code, answer = http_call(address, valid, deadline_s)
        if code != "HTTP_200":
            raise RuntimeError(f"http: the valid request failed: {code} {answer[:200]!r}")
        return json.loads(http_body(answer))

    before = job_json()
    log_before = proc.log_path.stat().st_size
    tally = Tally()
    requests = http_requests(n, rng)

    def one(raw: bytes):
        try:
            code, answer = http_call(address, raw, deadline_s)
        except OSError as e:
            code, answer = f"ERROR_{type(e).__name__}", b""
        complete_head = b"\r\n\r\n" in raw and raw[:1].isalpha()
        if code == "CLOSED" and complete_head:
            code = "HTTP_NO_STATUS"  # a readable request that got no answer at all
        tally.record(raw[:60].decode("latin-1"), code, answer[:300].decode("latin-1"), 1)

    started = time.monotonic()
    with RssPeak(proc.pid) as rss, ThreadPoolExecutor(8) as pool:
        for _ in pool.map(one, requests):
            pass
    seconds = time.monotonic() - started
    after = job_json()
    # The job's JSON carries the snapshot's clock nowhere but in the headers: compare it whole.
    return summary("http", tally, proc, rss, log_before, before == after, seconds)


def summary(name: str, tally: Tally, proc: Proc, rss: RssPeak, log_before: int, unchanged: bool,
            seconds: float) -> dict:
    return {
        "service": name,
        "messages": tally.messages,
        "calls": tally.calls,
        "crashes": 0 if proc.alive() else 1,
        "hangs": tally.hangs,
        "internal_or_unknown": tally.internal_or_unknown,
        "rss_growth_mb": round(rss.growth_mb, 1),
        "log_bytes": proc.log_path.stat().st_size - log_before,
        "valid_answer_unchanged": unchanged and proc.alive(),
        "seconds": round(seconds, 1),
        "codes": dict(tally.codes.most_common()),
        "attacks": dict(sorted(tally.attacks.items())),
        "examples": tally.examples,
    }


# ---- the swarm -------------------------------------------------------------------------------

def start_swarm(group: ProcGroup, workdir: Path, model: str, cache_dir: str | None, model_blocks: int,
                blocks: int) -> tuple[Proc, Proc]:
    token = workdir / "token"
    token.write_text(TOKEN + "\n")
    cache = ["--cache-dir", cache_dir] if cache_dir else []
    coord = group.start("coordinator", ["coordinator", "--data-dir", str(workdir / "coord-data"), "--port", "0",
                                        "--http-port", "0", "--token-file", str(token), "--model", model,
                                        "--num-blocks", str(model_blocks)])
    group.wait_ready([coord], timeout=120)
    node = group.start("node", ["node", "--coordinator", coord.info["grpc"], "--token-file", str(token),
                                "--model", model, *cache, "--num-blocks", str(blocks), "--throughput", "10",
                                "--torch-threads", "1"])
    group.wait_ready([node], timeout=300)
    return coord, node


def create_job(address: str) -> None:
    spec = job_spec(targets=["q_proj", "v_proj"])
    rpc = Rpc(address, methods_of(coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]), 30)
    code, detail, _ = rpc.call(Call("/pollinate.v1.Coordinator/CreateJob",
                                    [coordinator_pb2.CreateJobRequest(name=JOB, spec=spec).SerializeToString()]))
    rpc.close()
    if code != "OK":
        raise RuntimeError(f"CreateJob {JOB} failed: {code} {detail}")


def run(args: argparse.Namespace, workdir: Path) -> list[dict]:
    from pollinate.node.model_files import open_model

    n = args.messages or (1_000 if args.quick else 10_000)
    rng = random.Random(args.seed)
    files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
    hidden_size = files.config.hidden_size
    results = []
    with ProcGroup(workdir) as group:
        coord, node = start_swarm(group, workdir, args.model, args.cache_dir, files.config.num_hidden_layers,
                                  args.blocks)
        create_job(coord.info["grpc"])
        node_info = {"address": node.info["address"], "blocks": node.info["blocks"]}
        services = set(args.services)
        if "node" in services:
            import torch

            x = common_pb2.Tensor.FromString(tensor_chunks(
                torch.randn(1, 3, hidden_size, generator=torch.Generator().manual_seed(1)))[0])
            valid = Call("/pollinate.v1.Node/Forward", [
                node_pb2.ForwardRequest(header=node_pb2.ForwardHeader()).SerializeToString(),
                tensor_message(x, node_pb2.ForwardRequest)])
            results.append(fuzz_grpc("node", node, node_info["address"], node_pb2.DESCRIPTOR.services_by_name["Node"],
                                     node_seeds(hidden_size, node_info), node_attacks(hidden_size, node_info, rng),
                                     valid, n, rng, args.seed, args.deadline_s))
            print(json.dumps(results[-1]), flush=True)
        if "coordinator" in services:
            valid = Call("/pollinate.v1.Coordinator/GetJob", [coordinator_pb2.GetJobRequest(name=JOB).SerializeToString()])
            evidence = signed_forward(node_info, hidden_size)
            results.append(fuzz_grpc("coordinator", coord, coord.info["grpc"],
                                     coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
                                     coordinator_seeds(node_info, evidence), coordinator_attacks(node_info, evidence, rng),
                                     valid, n, rng, args.seed, args.deadline_s))
            print(json.dumps(results[-1]), flush=True)
        if "http" in services:
            results.append(fuzz_http(coord, coord.info["http"], n, rng, args.deadline_s))
            print(json.dumps(results[-1]), flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1,000 messages per service instead of 10,000")
    p.add_argument("--messages", type=int, default=0, help="messages per service (overrides --quick)")
    p.add_argument("--model", default="smollm2", help="model the node serves: 'smollm2' or a local directory")
    p.add_argument("--cache-dir", default=None, help="converted-model cache (default ~/.cache/pollinate)")
    p.add_argument("--blocks", type=int, default=2, help="blocks the node hosts (few: the fuzz is about parsing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=20.0, help="a call unanswered after this long is a hang")
    p.add_argument("--services", nargs="+", default=["node", "coordinator", "http"],
                   choices=["node", "coordinator", "http"])
    p.add_argument("--workdir", type=Path, help="logs go here (default: a temporary directory)")
    args = p.parse_args()
    if args.workdir is not None:
        results = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
            results = run(args, Path(d))
    bad = [r["service"] for r in results if r["crashes"] or r["hangs"] or r["internal_or_unknown"]
           or not r["valid_answer_unchanged"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
