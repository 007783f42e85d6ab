"""Where a node's blocks live and in what precision: `--device` and `--dtype`.

A volunteer types `pollinate node` and should get their GPU in the precision it runs
fastest, without reading code. `resolve_placement("auto", "auto")` picks:

- device: `cuda` (device 0) when torch sees a CUDA device, else `cpu`;
- dtype: bfloat16 on GPUs with native bf16 (compute capability 8.0+: Ampere, Hopper,
  Ada), float16 on older GPUs (their bf16 is emulated and slower), float32 on the CPU
  (CPU matmuls in bf16/fp16 are slower than fp32 on most volunteer CPUs, and fp32 keeps
  the CPU node bit-comparable with the local reference model in tests).

Choices the volunteer can make explicitly, and what happens:

- `cuda` / `cuda:N` without CUDA, or with N out of range: `ValueError` naming what torch
  sees, before anything is loaded.
- `--dtype float16` on the CPU: allowed, with a warning. It is the CPU twin of the
  older-GPU path (tests use it), but it is slow and fp16's narrow range can overflow
  activations that fp32/bf16 hold; bfloat16 is the better reduced precision on a CPU.
- `--dtype bfloat16` on a GPU without native bf16: allowed, with a warning (emulated).

Everything torch-probing sits behind `CudaProbe` so the policy (`choose_device`,
`choose_dtype`) is a pure function that tests drive with fake GPUs.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

# Spellings accepted for --dtype; the canonical name is the torch attribute name.
DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPE_CHOICES = "auto, float32, bfloat16 or float16"

# Compute capability from which bf16 is native on NVIDIA GPUs (Ampere, sm_80).
BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True, kw_only=True)
class CudaProbe:
    """What torch reports about CUDA on this machine; faked in tests."""

    # Number of CUDA devices torch can use; 0 when CUDA is absent or the build is CPU-only.
    device_count: int
    # (major, minor) compute capability per device index, same length as device_count.
    capabilities: tuple[tuple[int, int], ...] = ()
    # Marketing name per device index ("NVIDIA H100 80GB HBM3"); keys the throughput cache.
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.device_count < 0:
            raise ValueError(f"device_count must be >= 0, got {self.device_count}")
        if len(self.capabilities) != self.device_count or len(self.names) != self.device_count:
            raise ValueError(
                f"capabilities ({len(self.capabilities)}) and names ({len(self.names)}) "
                f"must have one entry per device ({self.device_count})"
            )

    @classmethod
    def detect(cls) -> "CudaProbe":
        """Ask torch; never raises on a CPU-only build or a machine without a driver."""
        try:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception as e:  # a broken driver install should degrade to CPU, loudly
            logger.warning("CUDA probe failed (%s); treating this machine as CPU-only", e)
            count = 0
        caps = tuple(tuple(torch.cuda.get_device_capability(i)) for i in range(count))
        names = tuple(torch.cuda.get_device_name(i) for i in range(count))
        return cls(device_count=count, capabilities=caps, names=names)


@dataclass(frozen=True, kw_only=True)
class Placement:
    """The resolved answer to --device/--dtype, with the reason for each choice."""

    # Where blocks, KV caches and adapters live.
    device: torch.device
    # Precision of block weights, KV caches and activations on the node.
    dtype: torch.dtype
    # Human name of the device (GPU model, or the CPU model); part of the throughput cache key.
    device_name: str
    # Why this device and dtype were chosen, for the start-up log line.
    reasons: tuple[str, ...] = field(default=())

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        return f"{self.device} ({self.device_name}), {self.dtype_name}: " + "; ".join(self.reasons)


def parse_dtype(spec: str) -> torch.dtype | None:
    """`auto` -> None (choose later); a known name -> the dtype; anything else -> ValueError."""
    key = spec.strip().lower()
    if key == "auto":
        return None
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown --dtype {spec!r}; expected {DTYPE_CHOICES}")
    return DTYPE_ALIASES[key]


def choose_device(spec: str, probe: CudaProbe) -> tuple[torch.device, str]:
    """Pure policy for --device: returns (device, reason) or raises ValueError."""
    key = spec.strip().lower()
    if key == "auto":
        if probe.device_count > 0:
            return torch.device("cuda", 0), f"auto: CUDA available ({probe.device_count} device(s)), using cuda:0"
        return torch.device("cpu"), "auto: no CUDA device visible to torch, using the CPU"
    if key == "cpu":
        return torch.device("cpu"), "cpu requested"
    if key == "cuda" or key.startswith("cuda:"):
        index_text = key.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ValueError(f"bad --device {spec!r}: the CUDA index must be a number, as in cuda:1")
        index = int(index_text)
        if probe.device_count == 0:
            raise ValueError(
                f"--device {spec!r} but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                "install a CUDA build of torch or use --device cpu"
            )
        if index >= probe.device_count:
            raise ValueError(
                f"--device {spec!r} but torch sees only {probe.device_count} CUDA device(s) "
                f"(valid: cuda:0..cuda:{probe.device_count - 1})"
            )
        return torch.device("cuda", index), f"{key} requested"
    raise ValueError(f"unknown --device {spec!r}; expected {DEVICE_CHOICES}")


def choose_dtype(spec: str, device: torch.device, probe: CudaProbe) -> tuple[torch.dtype, str]:
    """Pure policy for --dtype on a resolved device: returns (dtype, reason)."""
    requested = parse_dtype(spec)
    native_bf16 = device.type == "cuda" and _native_bf16(device, probe)
    if requested is None:
        if device.type == "cuda":
            if native_bf16:
                return torch.bfloat16, "auto: GPU has native bfloat16"
            cap = probe.capabilities[_index(device)]
            return torch.float16, f"auto: GPU compute capability {cap[0]}.{cap[1]} lacks native bfloat16, using float16"
        return torch.float32, "auto: float32 on the CPU"
    if device.type == "cpu" and requested == torch.float16:
        # Decision: warn, do not refuse. It is the CPU twin of the older-GPU fp16 path.
        logger.warning(
            "--dtype float16 on the CPU is slow and can overflow activations; "
            "prefer float32 (default) or bfloat16"
        )
        return requested, "float16 requested on the CPU (slow; see warning)"
    if device.type == "cuda" and requested == torch.bfloat16 and not native_bf16:
        logger.warning("this GPU has no native bfloat16; it will be emulated and slow, float16 is faster")
        return requested, "bfloat16 requested on a GPU without native bf16 (emulated)"
    return requested, f"{str(requested).removeprefix('torch.')} requested"


def resolve_placement(device: str = "auto", dtype: str = "auto", *, probe: CudaProbe | None = None) -> Placement:
    """Resolve --device and --dtype into a Placement; ValueError on an impossible request.

    `probe` defaults to asking torch; tests pass a fake one.
    """
    probe = CudaProbe.detect() if probe is None else probe
    dev, dev_reason = choose_device(device, probe)
    dt, dt_reason = choose_dtype(dtype, dev, probe)
    placement = Placement(device=dev, dtype=dt, device_name=device_name(dev, probe), reasons=(dev_reason, dt_reason))
    logger.info("placement: %s", placement.describe())
    return placement


def device_name(device: torch.device, probe: CudaProbe | None = None) -> str:
    """A stable human name: the GPU model for CUDA, the CPU model string for the CPU."""
    if device.type == "cuda":
        probe = CudaProbe.detect() if probe is None else probe
        return probe.names[_index(device)]
    return f"cpu {_cpu_model()}"


def _index(device: torch.device) -> int:
    return 0 if device.index is None else device.index


def _native_bf16(device: torch.device, probe: CudaProbe) -> bool:
    return probe.capabilities[_index(device)] >= BF16_MIN_CAPABILITY


def _cpu_model() -> str:
    # /proc/cpuinfo names the model on Linux; platform.processor() is often empty there.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
