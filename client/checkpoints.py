"""Intermediate checkpoints (issue 15): a job as it stood at round N, from the coordinator.

The coordinator stores each committed round's global state per span: θ_global as one flat
fp32 vector (and the outer momentum), in the order of the span's adapter parameters on the
nodes (node/rounds.py flattens `list(job.adapter.parameters())`). To name those numbers,
this module builds the same adapter locally on the same blocks from the job's registered
settings (node/adapters: same method, same targets, same order), writes the vector into it
(node/diloco.py assign_flat) and reads it back under PEFT's names (Adapter.peft_state). No
node is asked: a checkpoint can be exported after the swarm is gone.

    history = await job_history(coordinator, token, "sums")
    point = await fetch_checkpoint(coordinator, token, history, round_index=8)
    state = peft_state(point, files)   # -> client/peft_export.export_job
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True, kw_only=True)
class SpanCheckpoint:
    span: tuple[int, int]
    round: int  # the round whose state this is (the latest kept one <= the round asked)
    checksum: str  # as the coordinator stores it (sha256 of θ_global and momentum)
    theta: torch.Tensor  # θ_global, flat fp32


@dataclass(frozen=True, kw_only=True)
class JobCheckpoint:
    job: str
    asked: int  # the round asked; 0 = the last
    spec: object  # protocol/shared.py JobSpec
    spans: tuple[SpanCheckpoint, ...]  # in block order, tiling the model

    def describe(self) -> dict:
        return {"job": self.job, "round_asked": self.asked or None,
                "spans": [{"span": list(s.span), "round": s.round, "checksum": s.checksum} for s in self.spans]}


def history_to_dict(history) -> dict:
    """coordinator.proto JobHistory as plain values (the JSON of `pollinate job show/record`)."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(history, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


async def job_history(coordinator: str, token: str, job: str, *, timeout_s: float = 30.0, **tls):
    from pollinate.coordinator.client import call_coordinator
    from pollinate.protocol.v1 import coordinator_pb2

    return await call_coordinator(coordinator, token, "GetJobHistory", coordinator_pb2.GetJobHistoryRequest(name=job),
                                  timeout_s=timeout_s, **tls)


def job_spans(history, round_index: int = 0) -> list[tuple[int, int]]:
    """The spans the job has a kept state for at or before `round_index` (0: any), which must
    tile the blocks from 0 without overlap (a job whose spans were re-cut mid-run has states
    of two layouts; ValueError then names them)."""
    spans = sorted({(r.span.start, r.span.end) for r in history.rounds
                    if r.kept and (not round_index or r.round <= round_index)})
    if not spans:
        raise ValueError(f"job {history.job.name!r} has no kept checkpoint"
                         + (f" at or before round {round_index}" if round_index else ""))
    end = 0
    for start, stop in spans:
        if start != end:
            raise ValueError(f"job {history.job.name!r}: kept checkpoints of spans {spans} do not tile the blocks "
                             f"one after another from block 0")
        end = stop
    return spans


def kept_rounds(history) -> list[int]:
    """The round numbers for which at least one span kept its state, ascending."""
    return sorted({r.round for r in history.rounds if r.kept})


async def fetch_checkpoint(coordinator: str, token: str, history, *, round_index: int = 0,
                           timeout_s: float = 60.0, **tls) -> JobCheckpoint:
    """Every span's latest kept state at or before `round_index` (0: the last), checked
    against the checksum the coordinator stores."""
    from pollinate.compression.outer import state_checksum, state_from_bytes
    from pollinate.coordinator.client import fetch_committed_state
    from pollinate.protocol.shared import JobSpec
    from pollinate.protocol.v1 import common_pb2, coordinator_pb2

    if not history.job.spec.method:
        raise ValueError(f"job {history.job.name!r} has no registered settings at the coordinator "
                         f"(a job met in a round only); its adapter layout is unknown")
    spec = JobSpec.from_proto(history.job.spec)
    out = []
    for start, end in job_spans(history, round_index):
        reply = await fetch_committed_state(
            coordinator, token,
            coordinator_pb2.GetCommittedStateRequest(job=history.job.name, span=common_pb2.Span(start=start, end=end),
                                                     round=round_index), timeout_s=timeout_s, **tls)
        state = await asyncio.to_thread(state_from_bytes, reply.state)
        if state_checksum(state["global"], state["momentum"]) != reply.checksum:
            raise ValueError(f"span {start}:{end} round {reply.round}: the state received does not match its checksum")
        out.append(SpanCheckpoint(span=(start, end), round=int(reply.round), checksum=reply.checksum,
                                  theta=state["global"]))
    return JobCheckpoint(job=history.job.name, asked=round_index, spec=spec, spans=tuple(out))


def span_adapter(spec, files, span: tuple[int, int], theta: torch.Tensor | None = None, *,
                 blocks: dict | None = None):
    """The job's adapter built on blocks `span` as a node builds it, holding `theta` if given.
    `blocks`, if given, keeps the loaded spans by (start, end) for the next call (an analysis
    of many rounds reads each span's weights once)."""
    from pollinate.node.adapters import build_adapter
    from pollinate.node.diloco import assign_flat

    loaded = blocks if blocks is not None else {}
    if span not in loaded:
        loaded[span] = files.load_span(*span)
    adapter = build_adapter(spec, loaded[span])
    if theta is not None:
        with torch.no_grad():
            assign_flat(list(adapter.parameters()), theta)
    return adapter


def peft_state(point: JobCheckpoint, files, *, blocks: dict | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under PEFT's names, every span's together (`blocks`: see span_adapter)."""
    state: dict[str, torch.Tensor] = {}
    for s in point.spans:
        state.update(span_adapter(point.spec, files, s.span, s.theta, blocks=blocks).peft_state())
    return state


def flat_from_peft(spec, files, span: tuple[int, int], state: dict[str, torch.Tensor], *,
                   blocks: dict | None = None) -> torch.Tensor:
    """The inverse, to check an export: span `span`'s flat θ from PEFT-named tensors. Each
    parameter is first filled with its own flat positions (exact in fp32 below 2**24
    elements), so peft_state tells where every exported number sits in the flat vector,
    whatever copies or reshapes the method's naming makes."""
    from pollinate.node.diloco import assign_flat

    adapter = span_adapter(spec, files, span, blocks=blocks)
    params = list(adapter.parameters())
    numel = sum(p.numel() for p in params)
    if numel >= 1 << 24:
        raise ValueError(f"span {span[0]}:{span[1]}: {numel} adapter numbers, too many to locate exactly in fp32")
    with torch.no_grad():
        assign_flat(params, torch.arange(numel, dtype=torch.float32))
    theta = torch.full((numel,), float("nan"), dtype=torch.float32)
    for name, where in adapter.peft_state().items():
        if name not in state:
            raise ValueError(f"span {span[0]}:{span[1]}: tensor {name} missing from the export")
        theta[where.reshape(-1).long()] = state[name].reshape(-1).float()
    return theta


def code_version() -> dict:
    """pollinate's version and, from a git checkout, the commit (and whether it is modified)."""
    from pollinate import __version__

    here = Path(__file__).resolve().parent
    commit = ""
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "-modified"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": __version__, "git_commit": commit}


def write_checkpoint_note(out_dir: Path, point: JobCheckpoint) -> Path:
    """checkpoint.json beside the exported files: which round of which span they hold."""
    path = Path(out_dir) / "checkpoint.json"
    path.write_text(json.dumps(point.describe(), indent=1) + "\n")
    return path
