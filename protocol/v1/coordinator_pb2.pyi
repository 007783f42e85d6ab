from pollinate.protocol.v1 import common_pb2 as _common_pb2
from pollinate.protocol.v1 import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Piece(_message.Message):
    __slots__ = ("total_bytes", "data")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    data: bytes
    def __init__(self, total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReportLiarRequest(_message.Message):
    __slots__ = ("address", "peer_id", "blocks", "distance", "tolerance", "checkers", "evidence")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    CHECKERS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    address: str
    peer_id: str
    blocks: _common_pb2.Span
    distance: float
    tolerance: float
    checkers: _containers.RepeatedScalarFieldContainer[str]
    evidence: _node_pb2.AnswerEvidence
    def __init__(self, address: _Optional[str] = ..., peer_id: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., distance: _Optional[float] = ..., tolerance: _Optional[float] = ..., checkers: _Optional[_Iterable[str]] = ..., evidence: _Optional[_Union[_node_pb2.AnswerEvidence, _Mapping]] = ...) -> None: ...

class ReportLiarReply(_message.Message):
    __slots__ = ("quarantined", "verdict", "reporters", "needed")
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REPORTERS_FIELD_NUMBER: _ClassVar[int]
    NEEDED_FIELD_NUMBER: _ClassVar[int]
    quarantined: bool
    verdict: str
    reporters: int
    needed: int
    def __init__(self, quarantined: _Optional[bool] = ..., verdict: _Optional[str] = ..., reporters: _Optional[int] = ..., needed: _Optional[int] = ...) -> None: ...

class ListQuarantinedRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QuarantinedNode(_message.Message):
    __slots__ = ("address", "peer_id", "reporters", "since", "reason", "verified")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTERS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    address: str
    peer_id: str
    reporters: int
    since: float
    reason: str
    verified: bool
    def __init__(self, address: _Optional[str] = ..., peer_id: _Optional[str] = ..., reporters: _Optional[int] = ..., since: _Optional[float] = ..., reason: _Optional[str] = ..., verified: _Optional[bool] = ...) -> None: ...

class ListQuarantinedReply(_message.Message):
    __slots__ = ("nodes", "member_addresses", "lists_members")
    NODES_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    LISTS_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[QuarantinedNode]
    member_addresses: _containers.RepeatedScalarFieldContainer[str]
    lists_members: bool
    def __init__(self, nodes: _Optional[_Iterable[_Union[QuarantinedNode, _Mapping]]] = ..., member_addresses: _Optional[_Iterable[str]] = ..., lists_members: _Optional[bool] = ...) -> None: ...

class DataTlsCertificateRequest(_message.Message):
    __slots__ = ("member_id", "address")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    address: str
    def __init__(self, member_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class DataTlsCertificateReply(_message.Message):
    __slots__ = ("certificate_chain_pem", "ca_pem", "valid_s")
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    VALID_S_FIELD_NUMBER: _ClassVar[int]
    certificate_chain_pem: str
    ca_pem: str
    valid_s: float
    def __init__(self, certificate_chain_pem: _Optional[str] = ..., ca_pem: _Optional[str] = ..., valid_s: _Optional[float] = ...) -> None: ...

class CheckReachableRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class CheckReachableReply(_message.Message):
    __slots__ = ("reachable", "detail")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    detail: str
    def __init__(self, reachable: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("address", "model_id", "capacity_blocks", "throughput", "requested_span", "current_span", "name", "relay_maddr", "quant")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_SPAN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_SPAN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RELAY_MADDR_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    address: str
    model_id: str
    capacity_blocks: int
    throughput: float
    requested_span: _common_pb2.Span
    current_span: _common_pb2.Span
    name: str
    relay_maddr: str
    quant: str
    def __init__(self, address: _Optional[str] = ..., model_id: _Optional[str] = ..., capacity_blocks: _Optional[int] = ..., throughput: _Optional[float] = ..., requested_span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., current_span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., name: _Optional[str] = ..., relay_maddr: _Optional[str] = ..., quant: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("member_id", "epoch", "span", "dht_initial_peers", "heartbeat_period_s", "lease_s", "model_id", "num_blocks", "data_tls_ca_pem")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    DHT_INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_PERIOD_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_TLS_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    epoch: int
    span: _common_pb2.Span
    dht_initial_peers: _containers.RepeatedScalarFieldContainer[str]
    heartbeat_period_s: float
    lease_s: float
    model_id: str
    num_blocks: int
    data_tls_ca_pem: str
    def __init__(self, member_id: _Optional[str] = ..., epoch: _Optional[int] = ..., span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., dht_initial_peers: _Optional[_Iterable[str]] = ..., heartbeat_period_s: _Optional[float] = ..., lease_s: _Optional[float] = ..., model_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., data_tls_ca_pem: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("member_id", "serving_span", "throughput", "load", "trained_steps")
    class TrainedStepsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    SERVING_SPAN_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    TRAINED_STEPS_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    serving_span: _common_pb2.Span
    throughput: float
    load: _common_pb2.ServingLoad
    trained_steps: _containers.ScalarMap[str, int]
    def __init__(self, member_id: _Optional[str] = ..., serving_span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., throughput: _Optional[float] = ..., load: _Optional[_Union[_common_pb2.ServingLoad, _Mapping]] = ..., trained_steps: _Optional[_Mapping[str, int]] = ...) -> None: ...

class Instruction(_message.Message):
    __slots__ = ("kind", "span", "reason")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Instruction.Kind]
        NONE: _ClassVar[Instruction.Kind]
        MOVE: _ClassVar[Instruction.Kind]
    KIND_UNSPECIFIED: Instruction.Kind
    NONE: Instruction.Kind
    MOVE: Instruction.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: Instruction.Kind
    span: _common_pb2.Span
    reason: str
    def __init__(self, kind: _Optional[_Union[Instruction.Kind, str]] = ..., span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("epoch", "span", "instruction")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    span: _common_pb2.Span
    instruction: Instruction
    def __init__(self, epoch: _Optional[int] = ..., span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., instruction: _Optional[_Union[Instruction, _Mapping]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("member_id",)
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    def __init__(self, member_id: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberInfo(_message.Message):
    __slots__ = ("member_id", "address", "name", "span", "serving_span", "state", "throughput", "capacity_blocks", "pinned", "joined_at", "last_heartbeat_at", "quant", "load", "identity")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    SERVING_SPAN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    address: str
    name: str
    span: _common_pb2.Span
    serving_span: _common_pb2.Span
    state: str
    throughput: float
    capacity_blocks: int
    pinned: bool
    joined_at: float
    last_heartbeat_at: float
    quant: str
    load: _common_pb2.ServingLoad
    identity: str
    def __init__(self, member_id: _Optional[str] = ..., address: _Optional[str] = ..., name: _Optional[str] = ..., span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., serving_span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., state: _Optional[str] = ..., throughput: _Optional[float] = ..., capacity_blocks: _Optional[int] = ..., pinned: _Optional[bool] = ..., joined_at: _Optional[float] = ..., last_heartbeat_at: _Optional[float] = ..., quant: _Optional[str] = ..., load: _Optional[_Union[_common_pb2.ServingLoad, _Mapping]] = ..., identity: _Optional[str] = ...) -> None: ...

class BlockCoverage(_message.Message):
    __slots__ = ("block", "replicas", "throughput")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    block: int
    replicas: int
    throughput: float
    def __init__(self, block: _Optional[int] = ..., replicas: _Optional[int] = ..., throughput: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("epoch", "model_id", "num_blocks", "members", "blocks", "dht_initial_peers", "started_at", "version", "heartbeat_period_s", "lease_s", "jobs", "rounds", "relays", "quarantined", "data_tls_ca_pem")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DHT_INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_PERIOD_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    RELAYS_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    DATA_TLS_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    model_id: str
    num_blocks: int
    members: _containers.RepeatedCompositeFieldContainer[MemberInfo]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockCoverage]
    dht_initial_peers: _containers.RepeatedScalarFieldContainer[str]
    started_at: float
    version: str
    heartbeat_period_s: float
    lease_s: float
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    relays: _containers.RepeatedScalarFieldContainer[str]
    quarantined: _containers.RepeatedCompositeFieldContainer[QuarantinedNode]
    data_tls_ca_pem: str
    def __init__(self, epoch: _Optional[int] = ..., model_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., members: _Optional[_Iterable[_Union[MemberInfo, _Mapping]]] = ..., blocks: _Optional[_Iterable[_Union[BlockCoverage, _Mapping]]] = ..., dht_initial_peers: _Optional[_Iterable[str]] = ..., started_at: _Optional[float] = ..., version: _Optional[str] = ..., heartbeat_period_s: _Optional[float] = ..., lease_s: _Optional[float] = ..., jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ..., relays: _Optional[_Iterable[str]] = ..., quarantined: _Optional[_Iterable[_Union[QuarantinedNode, _Mapping]]] = ..., data_tls_ca_pem: _Optional[str] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("job", "span", "round", "committed_at", "members")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    job: str
    span: _common_pb2.Span
    round: int
    committed_at: float
    members: _containers.RepeatedCompositeFieldContainer[RoundMemberTraffic]
    def __init__(self, job: _Optional[str] = ..., span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., round: _Optional[int] = ..., committed_at: _Optional[float] = ..., members: _Optional[_Iterable[_Union[RoundMemberTraffic, _Mapping]]] = ...) -> None: ...

class RoundMemberTraffic(_message.Message):
    __slots__ = ("member_id", "shard_index", "bytes_sent", "bytes_received", "committed", "coordinator_bytes_sent", "coordinator_bytes_received")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    shard_index: int
    bytes_sent: int
    bytes_received: int
    committed: bool
    coordinator_bytes_sent: int
    coordinator_bytes_received: int
    def __init__(self, member_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., committed: _Optional[bool] = ..., coordinator_bytes_sent: _Optional[int] = ..., coordinator_bytes_received: _Optional[int] = ...) -> None: ...

class BeginRoundRequest(_message.Message):
    __slots__ = ("job", "span", "round", "member_id", "tokens")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    job: str
    span: _common_pb2.Span
    round: int
    member_id: str
    tokens: int
    def __init__(self, job: _Optional[str] = ..., span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., round: _Optional[int] = ..., member_id: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class RoundMember(_message.Message):
    __slots__ = ("member_id", "address")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    address: str
    def __init__(self, member_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class BeginRoundReply(_message.Message):
    __slots__ = ("round", "members", "shard_index", "attempt", "send_state")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SEND_STATE_FIELD_NUMBER: _ClassVar[int]
    round: int
    members: _containers.RepeatedCompositeFieldContainer[RoundMember]
    shard_index: int
    attempt: int
    send_state: bool
    def __init__(self, round: _Optional[int] = ..., members: _Optional[_Iterable[_Union[RoundMember, _Mapping]]] = ..., shard_index: _Optional[int] = ..., attempt: _Optional[int] = ..., send_state: _Optional[bool] = ...) -> None: ...

class OuterStepSettings(_message.Message):
    __slots__ = ("codec", "codec_params_json", "lr", "momentum", "nesterov")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    codec: str
    codec_params_json: str
    lr: float
    momentum: float
    nesterov: bool
    def __init__(self, codec: _Optional[str] = ..., codec_params_json: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., nesterov: _Optional[bool] = ...) -> None: ...

class ShardResultFrame(_message.Message):
    __slots__ = ("shard_index", "payload")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    payload: bytes
    def __init__(self, shard_index: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class CommitRoundRequest(_message.Message):
    __slots__ = ("job", "span", "round", "member_id", "checksum", "state", "attempt", "bytes_sent", "bytes_received", "coordinator_bytes_sent", "coordinator_bytes_received", "results", "outer", "base_state")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    OUTER_FIELD_NUMBER: _ClassVar[int]
    BASE_STATE_FIELD_NUMBER: _ClassVar[int]
    job: str
    span: _common_pb2.Span
    round: int
    member_id: str
    checksum: str
    state: bytes
    attempt: int
    bytes_sent: int
    bytes_received: int
    coordinator_bytes_sent: int
    coordinator_bytes_received: int
    results: _containers.RepeatedCompositeFieldContainer[ShardResultFrame]
    outer: OuterStepSettings
    base_state: bytes
    def __init__(self, job: _Optional[str] = ..., span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., round: _Optional[int] = ..., member_id: _Optional[str] = ..., checksum: _Optional[str] = ..., state: _Optional[bytes] = ..., attempt: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., coordinator_bytes_sent: _Optional[int] = ..., coordinator_bytes_received: _Optional[int] = ..., results: _Optional[_Iterable[_Union[ShardResultFrame, _Mapping]]] = ..., outer: _Optional[_Union[OuterStepSettings, _Mapping]] = ..., base_state: _Optional[bytes] = ...) -> None: ...

class CommitRoundReply(_message.Message):
    __slots__ = ("committed", "reason", "committed_round", "send_state")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    SEND_STATE_FIELD_NUMBER: _ClassVar[int]
    committed: bool
    reason: str
    committed_round: int
    send_state: bool
    def __init__(self, committed: _Optional[bool] = ..., reason: _Optional[str] = ..., committed_round: _Optional[int] = ..., send_state: _Optional[bool] = ...) -> None: ...

class GetCommittedStateRequest(_message.Message):
    __slots__ = ("job", "span", "round")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job: str
    span: _common_pb2.Span
    round: int
    def __init__(self, job: _Optional[str] = ..., span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., round: _Optional[int] = ...) -> None: ...

class GetCommittedStateReply(_message.Message):
    __slots__ = ("round", "checksum", "state", "state_bytes")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: int
    checksum: str
    state: bytes
    state_bytes: int
    def __init__(self, round: _Optional[int] = ..., checksum: _Optional[str] = ..., state: _Optional[bytes] = ..., state_bytes: _Optional[int] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("name", "base_model", "spec", "state", "created_at", "updated_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_model: str
    spec: _node_pb2.JobSpec
    state: str
    created_at: float
    updated_at: float
    def __init__(self, name: _Optional[str] = ..., base_model: _Optional[str] = ..., spec: _Optional[_Union[_node_pb2.JobSpec, _Mapping]] = ..., state: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("name", "spec")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: _node_pb2.JobSpec
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[_node_pb2.JobSpec, _Mapping]] = ...) -> None: ...

class CreateJobReply(_message.Message):
    __slots__ = ("job", "created")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    created: bool
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class DataFile(_message.Message):
    __slots__ = ("role", "name", "size_bytes", "sha256", "examples")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    role: str
    name: str
    size_bytes: int
    sha256: str
    examples: int
    def __init__(self, role: _Optional[str] = ..., name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., examples: _Optional[int] = ...) -> None: ...

class ReportTrainingRequest(_message.Message):
    __slots__ = ("job", "trainer_id", "data_files", "step", "tokens", "train_loss", "heldout_loss", "version", "git_commit")
    JOB_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FILES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_LOSS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GIT_COMMIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    trainer_id: str
    data_files: _containers.RepeatedCompositeFieldContainer[DataFile]
    step: int
    tokens: int
    train_loss: float
    heldout_loss: float
    version: str
    git_commit: str
    def __init__(self, job: _Optional[str] = ..., trainer_id: _Optional[str] = ..., data_files: _Optional[_Iterable[_Union[DataFile, _Mapping]]] = ..., step: _Optional[int] = ..., tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., heldout_loss: _Optional[float] = ..., version: _Optional[str] = ..., git_commit: _Optional[str] = ...) -> None: ...

class ReportTrainingReply(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class GetJobHistoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RoundMemberTokens(_message.Message):
    __slots__ = ("member_id", "shard_index", "tokens", "committed")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    shard_index: int
    tokens: int
    committed: bool
    def __init__(self, member_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., tokens: _Optional[int] = ..., committed: _Optional[bool] = ...) -> None: ...

class CommittedRound(_message.Message):
    __slots__ = ("span", "round", "checksum", "state_bytes", "committed_at", "members", "kept", "pruned_at", "pruned_reason")
    SPAN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    PRUNED_AT_FIELD_NUMBER: _ClassVar[int]
    PRUNED_REASON_FIELD_NUMBER: _ClassVar[int]
    span: _common_pb2.Span
    round: int
    checksum: str
    state_bytes: int
    committed_at: float
    members: _containers.RepeatedCompositeFieldContainer[RoundMemberTokens]
    kept: bool
    pruned_at: float
    pruned_reason: str
    def __init__(self, span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., round: _Optional[int] = ..., checksum: _Optional[str] = ..., state_bytes: _Optional[int] = ..., committed_at: _Optional[float] = ..., members: _Optional[_Iterable[_Union[RoundMemberTokens, _Mapping]]] = ..., kept: _Optional[bool] = ..., pruned_at: _Optional[float] = ..., pruned_reason: _Optional[str] = ...) -> None: ...

class LossReport(_message.Message):
    __slots__ = ("round", "trainer_id", "step", "tokens", "train_loss", "heldout_loss", "reported_at")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_LOSS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    round: int
    trainer_id: str
    step: int
    tokens: int
    train_loss: float
    heldout_loss: float
    reported_at: float
    def __init__(self, round: _Optional[int] = ..., trainer_id: _Optional[str] = ..., step: _Optional[int] = ..., tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., heldout_loss: _Optional[float] = ..., reported_at: _Optional[float] = ...) -> None: ...

class TrainerRecord(_message.Message):
    __slots__ = ("trainer_id", "data_files", "version", "git_commit", "joined_at")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FILES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GIT_COMMIT_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_FIELD_NUMBER: _ClassVar[int]
    trainer_id: str
    data_files: _containers.RepeatedCompositeFieldContainer[DataFile]
    version: str
    git_commit: str
    joined_at: float
    def __init__(self, trainer_id: _Optional[str] = ..., data_files: _Optional[_Iterable[_Union[DataFile, _Mapping]]] = ..., version: _Optional[str] = ..., git_commit: _Optional[str] = ..., joined_at: _Optional[float] = ...) -> None: ...

class JobHistory(_message.Message):
    __slots__ = ("job", "rounds", "losses", "trainers", "keep_last", "keep_log_spaced", "keep_every", "keep_max_bytes", "coordinator_version", "coordinator_max_bytes", "analysis")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    TRAINERS_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    KEEP_LOG_SPACED_FIELD_NUMBER: _ClassVar[int]
    KEEP_EVERY_FIELD_NUMBER: _ClassVar[int]
    KEEP_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    rounds: _containers.RepeatedCompositeFieldContainer[CommittedRound]
    losses: _containers.RepeatedCompositeFieldContainer[LossReport]
    trainers: _containers.RepeatedCompositeFieldContainer[TrainerRecord]
    keep_last: int
    keep_log_spaced: bool
    keep_every: int
    keep_max_bytes: int
    coordinator_version: str
    coordinator_max_bytes: int
    analysis: _containers.RepeatedCompositeFieldContainer[AnalysisRound]
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ..., rounds: _Optional[_Iterable[_Union[CommittedRound, _Mapping]]] = ..., losses: _Optional[_Iterable[_Union[LossReport, _Mapping]]] = ..., trainers: _Optional[_Iterable[_Union[TrainerRecord, _Mapping]]] = ..., keep_last: _Optional[int] = ..., keep_log_spaced: _Optional[bool] = ..., keep_every: _Optional[int] = ..., keep_max_bytes: _Optional[int] = ..., coordinator_version: _Optional[str] = ..., coordinator_max_bytes: _Optional[int] = ..., analysis: _Optional[_Iterable[_Union[AnalysisRound, _Mapping]]] = ...) -> None: ...

class AnalysisRound(_message.Message):
    __slots__ = ("round", "train_loss", "heldout_loss", "verbatim_train", "verbatim_heldout", "train_examples", "heldout_examples")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_LOSS_FIELD_NUMBER: _ClassVar[int]
    VERBATIM_TRAIN_FIELD_NUMBER: _ClassVar[int]
    VERBATIM_HELDOUT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    round: int
    train_loss: float
    heldout_loss: float
    verbatim_train: float
    verbatim_heldout: float
    train_examples: int
    heldout_examples: int
    def __init__(self, round: _Optional[int] = ..., train_loss: _Optional[float] = ..., heldout_loss: _Optional[float] = ..., verbatim_train: _Optional[float] = ..., verbatim_heldout: _Optional[float] = ..., train_examples: _Optional[int] = ..., heldout_examples: _Optional[int] = ...) -> None: ...

class ReportAnalysisRequest(_message.Message):
    __slots__ = ("job", "rounds", "data_sha256", "heldout_sha256")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DATA_SHA256_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_SHA256_FIELD_NUMBER: _ClassVar[int]
    job: str
    rounds: _containers.RepeatedCompositeFieldContainer[AnalysisRound]
    data_sha256: str
    heldout_sha256: str
    def __init__(self, job: _Optional[str] = ..., rounds: _Optional[_Iterable[_Union[AnalysisRound, _Mapping]]] = ..., data_sha256: _Optional[str] = ..., heldout_sha256: _Optional[str] = ...) -> None: ...

class ReportAnalysisReply(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...
