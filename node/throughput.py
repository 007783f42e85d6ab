"""A node's measured speed: what it announces, so routing and span assignment can use it.

On start a node times its own span on its own device, in two ways:

- inference: one-token steps with a KV cache, batch 1, as `generate()` drives a session;
- forward: one pass over a batch of sequences without a cache, as training `Forward` does.

Both are tokens per second through the whole span. The node announces the inference rate
(`Throughput.announced`): a client generating text pays one such step per token, so it is
the figure Dijkstra routing and Petals-style span assignment weigh. The forward rate is
kept beside it in the cache for training-aware routing.

Measuring costs seconds, so results are cached in `<cache_dir>/throughput.json`, keyed by
(model id, device name, dtype, span length): the same node restarted on the same card
reuses its figure. `--throughput eval` re-measures and rewrites the entry; `--throughput
123.4` announces that number and measures nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pollinate.node.device import device_name as _device_name

logger = logging.getLogger(__name__)

CACHE_FILE = "throughput.json"
# Bumped when the measurement changes meaning; entries of another version are ignored.
CACHE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ThroughputConfig:
    """How long and on what shapes a node times itself."""

    # Untimed one-token steps first: CUDA kernels compile/autotune and caches warm up.
    warmup_steps: int = 3
    # Timed one-token steps; 16 keeps a 30-block CPU span under ~2 s.
    inference_steps: int = 16
    # Tokens already in the KV cache before timing, so attention reads a realistic prefix.
    prefix_tokens: int = 32
    # Batch shape of the timed forward: 4 x 128 = 512 tokens, about one training micro-batch
    # of the toy jobs, and small enough for a CPU node to finish in seconds.
    forward_batch: int = 4
    forward_seq: int = 128
    # Timed forward passes (one untimed warm-up pass runs first).
    forward_repeats: int = 2
    # Random hidden states are drawn with this seed, so runs time the same inputs.
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("inference_steps", "forward_batch", "forward_seq", "forward_repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "prefix_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class Throughput:
    """A node's speed through its whole span, tokens per second."""

    inference_tokens_per_s: float  # one-token cached steps, batch 1
    forward_tokens_per_s: float  # forward over a batch, no cache
    source: str  # "measured", "cache" or "override"

    @property
    def announced(self) -> float:
        """The number the node announces (DHT record, coordinator)."""
        return self.inference_tokens_per_s

    def describe(self) -> str:
        return (
            f"{self.inference_tokens_per_s:.1f} tokens/s inference, "
            f"{self.forward_tokens_per_s:.1f} tokens/s forward ({self.source})"
        )


def parse_throughput(spec: str | float | None) -> str | float:
    """--throughput's value: "auto" (cache or measure), "eval" (re-measure), or a positive number.

    Usable as an argparse `type=`; raises ValueError naming the bad value.
    """
    if spec is None:
        return "auto"
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("auto", "eval"):
            return text
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--throughput must be auto, eval or a number of tokens/s, got {spec!r}") from None
    else:
        value = float(spec)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--throughput must be a positive finite number of tokens/s, got {spec!r}")
    return value


def cache_key(model_id: str, device_name: str, dtype: torch.dtype | str, num_blocks: int) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{model_id}|{device_name}|{dtype_name}|{num_blocks} blocks"


def resolve_throughput_info(
    spec: str | float | None,
    span,
    *,
    model_id: str,
    cache_dir: str | os.PathLike,
    device_name: str | None = None,
    config: ThroughputConfig = ThroughputConfig(),
) -> Throughput:
    """The node's Throughput for --throughput `spec` on `span` (a node.span.SpanModule).

    "auto"/None: the cached figure for (model_id, device, dtype, span length), measured and
    cached on a miss. "eval": measure now and overwrite the cache. A number: that number for
    both rates, nothing measured or cached.
    """
    choice = parse_throughput(spec)
    if isinstance(choice, float):
        result = Throughput(inference_tokens_per_s=choice, forward_tokens_per_s=choice, source="override")
        logger.info("throughput: %s", result.describe())
        return result
    name = device_name or _device_name(span.device)
    key = cache_key(model_id, name, span.dtype, span.num_blocks)
    path = Path(cache_dir).expanduser() / CACHE_FILE
    if choice == "auto":
        cached = read_cached(path, key)
        if cached is not None:
            logger.info("throughput of %s from %s: %s", key, path, cached.describe())
            return cached
    logger.info("measuring throughput of %s (blocks [%d, %d))", key, span.start, span.end)
    result = measure_throughput(span, config)
    write_cached(path, key, result)
    logger.info("throughput: %s; cached in %s", result.describe(), path)
    return result


def resolve_throughput(
    spec: str | float | None,
    span,
    *,
    model_id: str,
    cache_dir: str | os.PathLike,
    device_name: str | None = None,
    config: ThroughputConfig = ThroughputConfig(),
) -> float:
    """`resolve_throughput_info(...).announced`: the tokens/s figure a node announces."""
    return resolve_throughput_info(
        spec, span, model_id=model_id, cache_dir=cache_dir, device_name=device_name, config=config
    ).announced


def measure_throughput(span, config: ThroughputConfig = ThroughputConfig()) -> Throughput:
    """Time `span` on its own device and dtype; tokens/s through all its blocks."""
    device, dtype, hidden = span.device, span.dtype, span.hidden_size
    gen = torch.Generator().manual_seed(config.seed)

    def hidden_states(batch: int, seq: int) -> torch.Tensor:
        # Embedding-scale inputs (std 0.02, Llama's init range): realistic magnitudes
        # without loading an embedding table. Drawn on the CPU so the seed means the same
        # on every device.
        return (torch.randn(batch, seq, hidden, generator=gen) * 0.02).to(device=device, dtype=dtype)

    with torch.inference_mode():
        steps = config.warmup_steps + config.inference_steps
        cache = span.new_cache(batch_size=1, max_length=config.prefix_tokens + steps)
        if config.prefix_tokens:
            span(hidden_states(1, config.prefix_tokens), cache=cache)
        tokens = [hidden_states(1, 1) for _ in range(steps)]
        for x in tokens[: config.warmup_steps]:
            span(x, cache=cache)
        _sync(device)
        t0 = time.perf_counter()
        for x in tokens[config.warmup_steps :]:
            span(x, cache=cache)
        _sync(device)
        inference_s = time.perf_counter() - t0

        batch = hidden_states(config.forward_batch, config.forward_seq)
        span(batch)  # warm-up: kernel selection for the larger shape
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(config.forward_repeats):
            span(batch)
        _sync(device)
        forward_s = time.perf_counter() - t0

    forward_tokens = config.forward_batch * config.forward_seq * config.forward_repeats
    return Throughput(
        inference_tokens_per_s=config.inference_steps / max(inference_s, 1e-9),
        forward_tokens_per_s=forward_tokens / max(forward_s, 1e-9),
        source="measured",
    )


def read_cached(path: Path, key: str) -> Throughput | None:
    """The cached entry for `key`, or None (missing file, unknown key, other version, corrupt)."""
    entry = _read_cache(path).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        inference = float(entry["inference_tokens_per_s"])
        forward = float(entry["forward_tokens_per_s"])
    except (KeyError, TypeError, ValueError):
        logger.warning("ignoring malformed throughput cache entry %r in %s", key, path)
        return None
    if not (inference > 0 and forward > 0 and math.isfinite(inference) and math.isfinite(forward)):
        return None
    return Throughput(inference_tokens_per_s=inference, forward_tokens_per_s=forward, source="cache")


def write_cached(path: Path, key: str, result: Throughput) -> None:
    """Merge `result` under `key` into the cache file, atomically (temp file + rename).

    Two nodes on one machine may write at once; each rereads before writing, and the rename
    means a reader never sees a half-written file. The loser of a race loses only its entry,
    which it re-measures on its next start.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = _read_cache(path)
    entry = asdict(result)
    del entry["source"]
    entry["measured_at"] = time.time()
    entry["torch"] = torch.__version__
    entries[key] = entry
    text = json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable throughput cache %s: %s", path, e)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _sync(device: torch.device) -> None:
    # CUDA launches are asynchronous: without a sync the timer measures only the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
