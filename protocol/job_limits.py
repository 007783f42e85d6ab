"""The range of every JobSpec field (node.proto), checked where a spec crosses a boundary.

A job spec arrives from strangers: in the header of a Forward or Backward (the node builds
the job's adapter from it) and in CreateJob (the coordinator stores it and hands it out in
every Status). Each field has a documented range here, NaN and infinities are refused, and
both sides call the same function, so a spec one side accepts the other does too.

    check_job_fields({"rank": 8, "lr": 4e-4, "targets": ["q_proj"], ...})   # ValueError naming the field

The ranges are generous for real jobs and small enough that one spec cannot cost a node
gigabytes (a LoRA rank of 100000 did) or make a Status reply exceed a client's limit (a
1.2 MB targets list did).
"""

from __future__ import annotations

import math
import re

# Pseudo-gradient codecs a job may name (node/diloco.py; "" = the default).
JOB_CODECS = ("cocktail", "int8", "fp16", "none")
DEFAULT_ROUND_CODEC = "cocktail"  # a job's codec when it names none (node/diloco.py DiLoCoConfig.codec)
COCKTAIL_SETTINGS = ("p", "k", "bits", "bucket")  # the cocktail parameters a job may set (JobSpec.codec_*)
MAX_RANK = 1024  # LoRA rank, bottleneck width, LoReFT/GaLore rank, LLaMA-Adapter's top blocks
MAX_TARGETS = 32  # module name suffixes in targets / feedforward_modules
TARGET_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
# field -> (lowest, highest, lowest allowed itself); None = no bound on that side
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "rank": (0, MAX_RANK, False),
    "alpha": (0.0, 1e4, False),
    "lr": (0.0, 1.0, False),
    "weight_decay": (0.0, 10.0, True),
    "beta1": (0.0, 1.0 - 1e-12, True),
    "beta2": (0.0, 1.0 - 1e-12, True),
    "grad_clip": (0.0, 1e6, True),
    "micro_batches": (0, 1024, False),
    "round_steps": (0, 1_000_000, True),
    "num_virtual_tokens": (0, 1024, True),
    "codec_p": (0.0, 1.0, True),
    "codec_k": (0.0, 1.0, True),
    "codec_bits": (0, 8, True),
    "codec_bucket": (0, 1 << 20, True),
    "warmup_rounds": (0, 1_000_000, True),
    "outer_lr": (0.0, 10.0, True),
    "outer_momentum": (0.0, 1.0 - 1e-12, True),
    # checkpoint retention (issue 15, coordinator/retention.py)
    "keep_last": (1, 1_000_000, True),
    "keep_every": (0, 1_000_000, True),
    "keep_max_bytes": (0, 1 << 50, True),
}


def check_job_fields(fields: dict) -> None:
    """ValueError naming the first field out of its range (fields absent are not checked)."""
    for name, (low, high, low_ok) in RANGES.items():
        value = fields.get(name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if low is not None and (value < low or (value == low and not low_ok)):
            raise ValueError(f"{name} must be {'>=' if low_ok else '>'} {low}, got {value!r}")
        if high is not None and value > high:
            raise ValueError(f"{name} must be <= {high:g}, got {value!r}")
    for name in ("targets", "feedforward_modules"):
        names = list(fields.get(name) or ())
        if len(names) > MAX_TARGETS:
            raise ValueError(f"{name}: {len(names)} modules named, at most {MAX_TARGETS}")
        for target in names:
            if not isinstance(target, str) or not TARGET_RE.fullmatch(target):
                raise ValueError(f"{name}: {str(target)[:80]!r} is not a module name (letters, digits, '_', '.'; "
                                 f"at most 64)")
    codec = fields.get("codec") or ""
    if codec and codec not in JOB_CODECS:
        raise ValueError(f"codec must be one of {', '.join(JOB_CODECS)}, got {codec[:40]!r}")


def check_round_codec(codec: str, settings: dict) -> None:
    """ValueError unless the job's codec ("" = the default) takes the cocktail `settings` it
    sets ({"p": 0.5, ...}): only the cocktail codec has settings, and the codec's own
    constructor checks each value (pollinate.compression, imported here lazily). An unknown
    codec is check_job_fields' to refuse."""
    key = codec or DEFAULT_ROUND_CODEC
    if settings and key != "cocktail":
        raise ValueError(f"{', '.join(sorted(settings))} are cocktail settings; codec {key!r} takes none")
    if settings:  # no settings: the codec's defaults, valid by construction (and no torch import here)
        from pollinate.compression.codec import get_codec

        get_codec(key, **settings)
