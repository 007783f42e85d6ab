"""How many blocks fit on this node: the arithmetic behind a span chosen from free memory.

A node without `--blocks`/`--num-blocks` hosts as many blocks as its free memory holds.
Each block costs

    weights      parameters of one decoder block x bytes per element of the dtype
  + KV cache     kv_cache_tokens x 2 (K and V) x kv_heads x head_dim x bytes per element
  + training     LoRA parameters x 16 bytes (fp32 weight, grad, two AdamW moments)
                 + activations autograd keeps for one micro-batch of training_tokens

plus, once per span, the span inputs a recompute handoff keeps (node/handoff.py: each
session's incoming hidden states, kv_cache_tokens x hidden_size x 4 bytes at most), and a
fixed headroom is kept back from the free memory first (allocator fragmentation,
transient buffers of the attention kernel, codec buffers). Embeddings, the final norm and
the LM head run on the client, so a node pays for decoder blocks only.

Families differ in what a block holds (Qwen2's q/k/v biases, Qwen3's and Gemma 3's q/k
norms, Gemma's four norms, Phi-3's fused projections): `BlockShape.from_config` counts the
parameters and LoRA's Linear sizes on the family's own decoder layer, built on the meta
device (no memory), so the arithmetic is exact for every family in node/families.py.

`plan_span` is pure: it takes the free-memory figure, so tests and docs can run it for any
card. `require_fit` raises `SpanDoesNotFit` naming the numbers, which the node calls
before loading any weights. `free_memory_bytes` reads the figure for a real device.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2

# fp32 adapter weight + fp32 grad + AdamW exp_avg + exp_avg_sq, 4 bytes each.
ADAPTER_BYTES_PER_PARAM = 16
# Linear layers of a Llama block LoRA may target (the default targets all of them).
LORA_TARGETS = 7


class SpanDoesNotFit(ValueError):
    """The requested span needs more memory than the device has free."""


@dataclass(frozen=True, kw_only=True)
class BlockShape:
    """The shape of one Llama-family decoder block: all sizing needs from the model config."""

    # Model width (hidden_size); SmolLM2-135M: 576, Llama-2-7B: 4096.
    hidden_size: int
    # MLP width (intermediate_size); SmolLM2-135M: 1536, Llama-2-7B: 11008.
    intermediate_size: int
    # Query heads (num_attention_heads).
    num_heads: int
    # Key/value heads (num_key_value_heads); fewer than num_heads under grouped-query attention.
    num_kv_heads: int
    # Per-head width; hidden_size // num_heads unless the config says otherwise.
    head_dim: int
    # Decoder blocks in the whole model; a node never hosts more.
    num_blocks: int
    # Bias vectors on q/k/v/o (attention_bias) and on the MLP (mlp_bias); false for Llama.
    attention_bias: bool = False
    mlp_bias: bool = False
    # Exact parameters of one block, counted on the family's own decoder layer by
    # from_config; 0: computed from the fields above for a Llama block.
    block_params: int = 0
    # Sum of in + out features over the block's Linear modules (LoRA of rank r on all of
    # them adds r x this), counted by from_config; 0: Llama's seven projections.
    linear_io: int = 0
    # Linear weights of one block (what --quant quantises), counted by from_config; 0:
    # Llama's seven projections from the fields above.
    linear_params: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "num_blocks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_config(cls, config: Any) -> "BlockShape":
        """From a transformers config of a supported family (exact counts from its decoder
        layer), or anything with LlamaConfig's attribute names (Llama arithmetic)."""
        block_params, linear_io, linear_params = _count_block(config)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            num_blocks=config.num_hidden_layers,
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            block_params=block_params,
            linear_io=linear_io,
            linear_params=linear_params,
        )

    def params_per_block(self) -> int:
        if self.block_params:
            return self.block_params
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h  # q, k, v, o projections
        mlp = 3 * h * i  # gate, up, down
        norms = 2 * h  # input and post-attention RMSNorm
        biases = (q + 2 * kv + h if self.attention_bias else 0) + (2 * i + h if self.mlp_bias else 0)
        return attention + mlp + norms + biases

    def linear_params_per_block(self) -> int:
        """Weights of the block's Linear modules: what quantisation shrinks."""
        if self.linear_params:
            return self.linear_params
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * i

    def weight_bytes_per_block(self, dtype: torch.dtype, quant: str = "none") -> int:
        """Bytes of one block's weights at `dtype`, its Linear weights under `quant` (node/quant.py)."""
        from pollinate.node.quant import weight_bytes_per_param

        elem = dtype_bytes(dtype)
        if quant == "none":
            return self.params_per_block() * elem
        weights = self.linear_params_per_block()
        return round(weights * weight_bytes_per_param(quant, dtype)) + (self.params_per_block() - weights) * elem

    def lora_params_per_block(self, rank: int) -> int:
        if self.linear_io:
            return rank * self.linear_io
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # LoRA on a (in -> out) linear adds rank x (in + out) parameters.
        return rank * ((h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i))


@dataclass(frozen=True, kw_only=True)
class SizingConfig:
    """What a node budgets per block besides its weights."""

    # Tokens of KV cache each block holds, summed over all live inference sessions.
    # 8192: e.g. four 2048-token sessions; Petals budgets a similar per-block cache.
    kv_cache_tokens: int = 8192
    # Tokens in one training micro-batch whose activations autograd keeps for backward;
    # 0 for a node that only serves inference. 2048: a batch of 8 x 256-token sequences.
    training_tokens: int = 2048
    # LoRA rank budgeted for training (all 7 linear layers targeted); the default job rank
    # is 8, 16 leaves room for a larger one.
    lora_rank: int = 16
    # Bytes kept back from free memory before anything is counted: allocator
    # fragmentation, attention-kernel workspaces, codec buffers. 512 MiB measured as enough
    # for SmolLM2 on a CPU node; large models add headroom_fraction on top.
    headroom_bytes: int = 512 * MiB
    # Fraction of free memory also kept back, because fragmentation grows with the span.
    headroom_fraction: float = 0.05
    # Count the span inputs sessions keep for a recompute handoff (--handoff recompute, the
    # default): kv_cache_tokens x hidden_size x 4 bytes (fp32, the widest a wire sends) for
    # the whole span, not per block. SmolLM2, 8192 tokens: 18 MiB.
    session_inputs: bool = True

    def __post_init__(self) -> None:
        for name in ("kv_cache_tokens", "training_tokens", "lora_rank", "headroom_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.headroom_fraction < 1.0:
            raise ValueError(f"headroom_fraction must be in [0, 1), got {self.headroom_fraction}")


@dataclass(frozen=True, kw_only=True)
class SpanSizing:
    """The arithmetic behind a span size, kept so it can be logged and tested."""

    free_bytes: int  # free memory reported for the device
    headroom_bytes: int  # kept back: headroom_bytes + headroom_fraction x free
    usable_bytes: int  # free - headroom, never negative
    dtype: str  # e.g. "bfloat16"
    weight_bytes_per_block: int
    kv_bytes_per_block: int
    training_bytes_per_block: int
    bytes_per_block: int  # the sum of the three above
    inputs_bytes: int  # once per span: span inputs kept for recompute handoffs
    model_blocks: int  # blocks in the whole model
    blocks_that_fit: int  # min(model_blocks, (usable - inputs_bytes) // bytes_per_block)

    def explain(self) -> str:
        """One log line a volunteer can check by hand."""
        return (
            f"{_gib(self.free_bytes)} free - {_gib(self.headroom_bytes)} headroom = {_gib(self.usable_bytes)} usable; "
            f"per block at {self.dtype}: {_mib(self.weight_bytes_per_block)} weights + "
            f"{_mib(self.kv_bytes_per_block)} KV cache + {_mib(self.training_bytes_per_block)} training = "
            f"{_mib(self.bytes_per_block)}; ({self.usable_bytes} - {self.inputs_bytes} session inputs) // "
            f"{self.bytes_per_block} = {max(0, self.usable_bytes - self.inputs_bytes) // self.bytes_per_block} blocks, "
            f"{self.blocks_that_fit} of the model's {self.model_blocks} hosted"
        )

    def bytes_for(self, num_blocks: int) -> int:
        return num_blocks * self.bytes_per_block + self.inputs_bytes


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_span(free_bytes: int, shape: BlockShape, dtype: torch.dtype, config: SizingConfig = SizingConfig(),
              *, quant: str = "none") -> SpanSizing:
    """Pure: how many of the model's blocks fit in `free_bytes` at `dtype` under `config`,
    with the blocks' Linear weights quantised as `quant` says (node/quant.py)."""
    if free_bytes < 0:
        raise ValueError(f"free_bytes must be >= 0, got {free_bytes}")
    elem = dtype_bytes(dtype)
    weights = shape.weight_bytes_per_block(dtype, quant)
    kv = config.kv_cache_tokens * 2 * shape.num_kv_heads * shape.head_dim * elem
    training = 0
    if config.training_tokens > 0:
        adapters = shape.lora_params_per_block(config.lora_rank) * ADAPTER_BYTES_PER_PARAM
        training = adapters + config.training_tokens * _activation_elems_per_token(shape) * elem
    per_block = weights + kv + training
    inputs = config.kv_cache_tokens * shape.hidden_size * 4 if config.session_inputs else 0
    headroom = config.headroom_bytes + int(config.headroom_fraction * free_bytes)
    usable = max(0, free_bytes - headroom)
    return SpanSizing(
        free_bytes=free_bytes,
        headroom_bytes=headroom,
        usable_bytes=usable,
        dtype=str(dtype).removeprefix("torch.") + ("" if quant == "none" else f" ({quant} weights)"),
        weight_bytes_per_block=weights,
        kv_bytes_per_block=kv,
        training_bytes_per_block=training,
        bytes_per_block=per_block,
        inputs_bytes=inputs,
        model_blocks=shape.num_blocks,
        blocks_that_fit=min(shape.num_blocks, max(0, usable - inputs) // per_block),
    )


def require_fit(sizing: SpanSizing, num_blocks: int) -> None:
    """Raise SpanDoesNotFit, naming the numbers, if `num_blocks` blocks do not fit."""
    if num_blocks <= 0:
        raise ValueError(f"a span needs at least one block, got {num_blocks}")
    need = sizing.bytes_for(num_blocks)
    if need > sizing.usable_bytes:
        raise SpanDoesNotFit(
            f"{num_blocks} blocks need {_gib(need)} ({num_blocks} x {_mib(sizing.bytes_per_block)} per block at "
            f"{sizing.dtype}: {_mib(sizing.weight_bytes_per_block)} weights + {_mib(sizing.kv_bytes_per_block)} KV cache + "
            f"{_mib(sizing.training_bytes_per_block)} training, + {_mib(sizing.inputs_bytes)} session inputs) but "
            f"only {_gib(sizing.usable_bytes)} is usable ({_gib(sizing.free_bytes)} free - "
            f"{_gib(sizing.headroom_bytes)} headroom); at most {sizing.blocks_that_fit} blocks fit. Ask for fewer "
            "blocks, a smaller --dtype, or fewer KV-cache tokens"
        )


def choose_num_blocks(
    free_bytes: int,
    shape: BlockShape,
    dtype: torch.dtype,
    config: SizingConfig = SizingConfig(),
    *,
    requested: int | None = None,
    quant: str = "none",
) -> tuple[int, SpanSizing]:
    """The node's decision: `requested` blocks if they fit, else as many as fit; logged.

    Raises SpanDoesNotFit when `requested` does not fit, or when not even one block does.
    """
    sizing = plan_span(free_bytes, shape, dtype, config, quant=quant)
    logger.info("span sizing: %s", sizing.explain())
    if requested is not None:
        if requested > shape.num_blocks:
            raise ValueError(f"requested {requested} blocks but the model has only {shape.num_blocks}")
        require_fit(sizing, requested)
        return requested, sizing
    require_fit(sizing, 1)
    return sizing.blocks_that_fit, sizing


def choose_quant(mode: str, *, device_type: str, free_bytes: int | None, shape: BlockShape, dtype: torch.dtype,
                 wanted_blocks: int, config: SizingConfig = SizingConfig(),
                 int4_unavailable: str = "") -> tuple[str, str]:
    """Pure: (quantisation, why) for `--quant mode`. Anything but "auto" is kept as asked.
    "auto": int4 on CUDA when `wanted_blocks` (the --blocks span, --num-blocks, else the
    whole model) do not fit in `free_bytes` at `dtype` and full precision, else none; none
    off CUDA, where int4's kernel computes in bf16 and a CPU node's RAM is rarely the limit;
    none, saying why, where `int4_unavailable` (node/quant.py's reason) rules int4 out."""
    if mode != "auto":
        return mode, "asked for"
    if device_type != "cuda":
        return "none", f"auto on {device_type}: full precision (auto quantises on CUDA only)"
    if free_bytes is None:
        raise ValueError("--quant auto on CUDA needs the free memory")
    full = plan_span(free_bytes, shape, dtype, config)
    need = full.bytes_for(wanted_blocks)
    if need <= full.usable_bytes:
        return "none", (f"auto: {wanted_blocks} blocks fit at {full.dtype} ({_gib(need)} of "
                        f"{_gib(full.usable_bytes)} usable)")
    if int4_unavailable:
        return "none", (f"auto: {wanted_blocks} blocks need {_gib(need)} at {full.dtype} but only "
                        f"{_gib(full.usable_bytes)} is usable, and {int4_unavailable}")
    int4 = plan_span(free_bytes, shape, dtype, config, quant="int4")
    return "int4", (f"auto: {wanted_blocks} blocks need {_gib(need)} at {full.dtype} but {_gib(full.usable_bytes)} "
                    f"is usable ({full.blocks_that_fit} fit); with int4 weights a block takes "
                    f"{_mib(int4.bytes_per_block)} and {int4.blocks_that_fit} fit")


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory on `device` now: the CUDA driver's figure, or available RAM for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return cpu_available_bytes()
    raise ValueError(f"free memory is not known for device type {device.type!r}")


def cpu_available_bytes(meminfo_path: str = "/proc/meminfo", cgroup_dir: str = "/sys/fs/cgroup") -> int:
    """Available RAM: MemAvailable, capped by a cgroup v2 memory limit (containers)."""
    available = _meminfo_available(meminfo_path)
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup_free = _cgroup_free(cgroup_dir)
    return min(available, cgroup_free) if cgroup_free is not None else available


def _count_block(config: Any) -> tuple[int, int, int]:
    """(parameters, sum of Linear in + out features, Linear weights) of one decoder block of
    `config`'s family, built on the meta device; zeros for a config that is not a supported
    family."""
    from torch import nn

    from pollinate.node.families import UnsupportedFamilyError, family_of

    try:
        family = family_of(config)
    except (UnsupportedFamilyError, AttributeError, TypeError):
        return 0, 0, 0
    with torch.device("meta"):
        layer = family.cls("decoder_layer")(config, layer_idx=0)
    params = sum(p.numel() for p in layer.parameters())
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    linear_io = sum(m.in_features + m.out_features for m in linears)
    return params, linear_io, sum(m.weight.numel() for m in linears)


def _activation_elems_per_token(shape: BlockShape) -> int:
    # Tensors autograd saves per token in a Llama block without recomputation: the two
    # norm inputs and outputs, q/k/v before and after rotary, the attention output, the
    # o-projection input (~10 x hidden), and gate, up, act(gate), act(gate)*up (4 x
    # intermediate). Attention scores are not counted: SDPA's fused kernels do not keep them.
    return 10 * shape.hidden_size + 4 * shape.intermediate_size


def _meminfo_available(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file says kB, meaning KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_free(cgroup_dir: str) -> int | None:
    try:
        with open(os.path.join(cgroup_dir, "memory.max"), encoding="utf-8") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(cgroup_dir, "memory.current"), encoding="utf-8") as f:
            current = int(f.read().strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError):
        return None


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"
