from pollinate.protocol.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("span", "model_id", "hidden_size", "dtype", "throughput", "version", "num_blocks", "load")
    SPAN_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    span: _common_pb2.Span
    model_id: str
    hidden_size: int
    dtype: str
    throughput: float
    version: str
    num_blocks: int
    load: _common_pb2.ServingLoad
    def __init__(self, span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., model_id: _Optional[str] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., throughput: _Optional[float] = ..., version: _Optional[str] = ..., num_blocks: _Optional[int] = ..., load: _Optional[_Union[_common_pb2.ServingLoad, _Mapping]] = ...) -> None: ...

class ForwardHeader(_message.Message):
    __slots__ = ("job", "reply_codec", "blocks", "request_id", "spec", "keep_id")
    JOB_FIELD_NUMBER: _ClassVar[int]
    REPLY_CODEC_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    KEEP_ID_FIELD_NUMBER: _ClassVar[int]
    job: str
    reply_codec: str
    blocks: _common_pb2.Span
    request_id: str
    spec: JobSpec
    keep_id: str
    def __init__(self, job: _Optional[str] = ..., reply_codec: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., request_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., keep_id: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: ForwardHeader
    tensor: _common_pb2.Tensor
    def __init__(self, header: _Optional[_Union[ForwardHeader, _Mapping]] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("tensor", "signature")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    tensor: _common_pb2.Tensor
    signature: AnswerSignature
    def __init__(self, tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., signature: _Optional[_Union[AnswerSignature, _Mapping]] = ...) -> None: ...

class BackwardHeader(_message.Message):
    __slots__ = ("job", "reply_codec", "blocks", "request_id", "spec", "keep_id", "skip_grad_inputs", "check_only", "return_adapter")
    JOB_FIELD_NUMBER: _ClassVar[int]
    REPLY_CODEC_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    KEEP_ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_GRAD_INPUTS_FIELD_NUMBER: _ClassVar[int]
    CHECK_ONLY_FIELD_NUMBER: _ClassVar[int]
    RETURN_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    job: str
    reply_codec: str
    blocks: _common_pb2.Span
    request_id: str
    spec: JobSpec
    keep_id: str
    skip_grad_inputs: bool
    check_only: bool
    return_adapter: bool
    def __init__(self, job: _Optional[str] = ..., reply_codec: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., request_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., keep_id: _Optional[str] = ..., skip_grad_inputs: _Optional[bool] = ..., check_only: _Optional[bool] = ..., return_adapter: _Optional[bool] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: BackwardHeader
    tensor: _common_pb2.Tensor
    def __init__(self, header: _Optional[_Union[BackwardHeader, _Mapping]] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("tensor", "signature")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    tensor: _common_pb2.Tensor
    signature: AnswerSignature
    def __init__(self, tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., signature: _Optional[_Union[AnswerSignature, _Mapping]] = ...) -> None: ...

class InferenceOpen(_message.Message):
    __slots__ = ("session_id", "max_length", "job", "reply_codec", "blocks", "resume_digest", "resume_secret")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    REPLY_CODEC_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESUME_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RESUME_SECRET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    job: str
    reply_codec: str
    blocks: _common_pb2.Span
    resume_digest: bytes
    resume_secret: bytes
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ..., job: _Optional[str] = ..., reply_codec: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., resume_digest: _Optional[bytes] = ..., resume_secret: _Optional[bytes] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "position", "tensor")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    open: InferenceOpen
    position: int
    tensor: _common_pb2.Tensor
    def __init__(self, open: _Optional[_Union[InferenceOpen, _Mapping]] = ..., position: _Optional[int] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class InferenceReply(_message.Message):
    __slots__ = ("position", "tensor", "signature")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    position: int
    tensor: _common_pb2.Tensor
    signature: AnswerSignature
    def __init__(self, position: _Optional[int] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., signature: _Optional[_Union[AnswerSignature, _Mapping]] = ...) -> None: ...

class ShardMessage(_message.Message):
    __slots__ = ("job", "span", "round", "sender_id", "shard_index", "weight", "kind", "tensor", "attempt")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ShardMessage.Kind]
        CONTRIBUTION: _ClassVar[ShardMessage.Kind]
        RESULT: _ClassVar[ShardMessage.Kind]
    KIND_UNSPECIFIED: ShardMessage.Kind
    CONTRIBUTION: ShardMessage.Kind
    RESULT: ShardMessage.Kind
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job: str
    span: _common_pb2.Span
    round: int
    sender_id: str
    shard_index: int
    weight: int
    kind: ShardMessage.Kind
    tensor: _common_pb2.Tensor
    attempt: int
    def __init__(self, job: _Optional[str] = ..., span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., round: _Optional[int] = ..., sender_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., weight: _Optional[int] = ..., kind: _Optional[_Union[ShardMessage.Kind, str]] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("job", "span", "round")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job: str
    span: _common_pb2.Span
    round: int
    def __init__(self, job: _Optional[str] = ..., span: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., round: _Optional[int] = ...) -> None: ...

class GetStateReply(_message.Message):
    __slots__ = ("round", "tensor", "spec")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    round: int
    tensor: _common_pb2.Tensor
    spec: JobSpec
    def __init__(self, round: _Optional[int] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("method", "rank", "alpha", "targets", "lr", "weight_decay", "beta1", "beta2", "grad_clip", "micro_batches", "seed", "round_steps", "feedforward_modules", "num_virtual_tokens", "codec", "codec_p", "codec_k", "codec_bits", "codec_bucket", "warmup_rounds", "outer_lr", "outer_momentum", "overlap_rounds", "keep_last", "keep_log_spaced", "keep_every", "keep_max_bytes")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ROUND_STEPS_FIELD_NUMBER: _ClassVar[int]
    FEEDFORWARD_MODULES_FIELD_NUMBER: _ClassVar[int]
    NUM_VIRTUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_P_FIELD_NUMBER: _ClassVar[int]
    CODEC_K_FIELD_NUMBER: _ClassVar[int]
    CODEC_BITS_FIELD_NUMBER: _ClassVar[int]
    CODEC_BUCKET_FIELD_NUMBER: _ClassVar[int]
    WARMUP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    OUTER_LR_FIELD_NUMBER: _ClassVar[int]
    OUTER_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    KEEP_LOG_SPACED_FIELD_NUMBER: _ClassVar[int]
    KEEP_EVERY_FIELD_NUMBER: _ClassVar[int]
    KEEP_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    method: str
    rank: int
    alpha: float
    targets: _containers.RepeatedScalarFieldContainer[str]
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    micro_batches: int
    seed: int
    round_steps: int
    feedforward_modules: _containers.RepeatedScalarFieldContainer[str]
    num_virtual_tokens: int
    codec: str
    codec_p: float
    codec_k: float
    codec_bits: int
    codec_bucket: int
    warmup_rounds: int
    outer_lr: float
    outer_momentum: float
    overlap_rounds: bool
    keep_last: int
    keep_log_spaced: bool
    keep_every: int
    keep_max_bytes: int
    def __init__(self, method: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., targets: _Optional[_Iterable[str]] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., grad_clip: _Optional[float] = ..., micro_batches: _Optional[int] = ..., seed: _Optional[int] = ..., round_steps: _Optional[int] = ..., feedforward_modules: _Optional[_Iterable[str]] = ..., num_virtual_tokens: _Optional[int] = ..., codec: _Optional[str] = ..., codec_p: _Optional[float] = ..., codec_k: _Optional[float] = ..., codec_bits: _Optional[int] = ..., codec_bucket: _Optional[int] = ..., warmup_rounds: _Optional[int] = ..., outer_lr: _Optional[float] = ..., outer_momentum: _Optional[float] = ..., overlap_rounds: _Optional[bool] = ..., keep_last: _Optional[int] = ..., keep_log_spaced: _Optional[bool] = ..., keep_every: _Optional[int] = ..., keep_max_bytes: _Optional[int] = ...) -> None: ...

class HandOffHeader(_message.Message):
    __slots__ = ("session_id", "blocks", "max_length", "batch_size", "position", "resume_digest", "job", "payload_bytes", "from_position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    RESUME_DIGEST_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    FROM_POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    blocks: _common_pb2.Span
    max_length: int
    batch_size: int
    position: int
    resume_digest: bytes
    job: str
    payload_bytes: int
    from_position: int
    def __init__(self, session_id: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., max_length: _Optional[int] = ..., batch_size: _Optional[int] = ..., position: _Optional[int] = ..., resume_digest: _Optional[bytes] = ..., job: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., from_position: _Optional[int] = ...) -> None: ...

class HandOffRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: HandOffHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[HandOffHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class HandOffReply(_message.Message):
    __slots__ = ("position", "hold_s")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HOLD_S_FIELD_NUMBER: _ClassVar[int]
    position: int
    hold_s: float
    def __init__(self, position: _Optional[int] = ..., hold_s: _Optional[float] = ...) -> None: ...

class AnswerSignature(_message.Message):
    __slots__ = ("nonce", "signature", "prefix")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    signature: bytes
    prefix: bytes
    def __init__(self, nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., prefix: _Optional[bytes] = ...) -> None: ...

class EvidenceStep(_message.Message):
    __slots__ = ("position", "tensors")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    position: int
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    def __init__(self, position: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class AnswerEvidence(_message.Message):
    __slots__ = ("kind", "nonce", "job", "blocks", "spec", "steps", "signature", "prefix")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    kind: str
    nonce: bytes
    job: str
    blocks: _common_pb2.Span
    spec: JobSpec
    steps: _containers.RepeatedCompositeFieldContainer[EvidenceStep]
    signature: bytes
    prefix: _common_pb2.Tensor
    def __init__(self, kind: _Optional[str] = ..., nonce: _Optional[bytes] = ..., job: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.Span, _Mapping]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[EvidenceStep, _Mapping]]] = ..., signature: _Optional[bytes] = ..., prefix: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
