"""Job specs from strangers (issue 18, item 3): every field in its documented range, NaN and
infinities refused, the same way on the node (JobSpec, from request headers) and at the
coordinator (CreateJob), before anything is allocated or stored."""

from __future__ import annotations

import pytest

from pollinate.coordinator.jobs import check_spec, spec_to_dict
from pollinate.protocol.errors import InvalidRequest
from pollinate.protocol.job_limits import MAX_RANK, MAX_TARGETS
from pollinate.protocol.shared import JobSpec
from pollinate.protocol.v1 import node_pb2

HOSTILE = [
    ({"rank": 100000}, "rank must be <= 1024"),
    ({"rank": 2 ** 32 - 1}, "rank must be <= 1024"),
    ({"alpha": float("inf")}, "alpha must be finite"),
    ({"lr": float("inf")}, "lr must be finite"),
    ({"lr": 5.0}, "lr must be <= 1"),
    ({"grad_clip": float("nan")}, "grad_clip must be finite"),
    ({"targets": [f"m{i}" for i in range(MAX_TARGETS + 1)]}, "at most 32"),
    ({"targets": ["q_proj\n03:00 forged"]}, "is not a module name"),
    ({"targets": ["x" * 100_000]}, "is not a module name"),
    ({"codec": "bogus"}, "codec must be one of"),
    ({"codec": "cocktail", "codec_p": 5.0}, "p must be"),  # the node says "p must be in (0, 1]"
    ({"micro_batches": 10 ** 6}, "micro_batches must be <= 1024"),
]


@pytest.mark.parametrize("fields,why", HOSTILE)
def test_a_hostile_spec_is_refused_by_the_node_and_the_coordinator(fields, why):
    msg = JobSpec().to_proto(node_pb2)
    for key, value in fields.items():
        if isinstance(value, list):
            del getattr(msg, key)[:]
            getattr(msg, key).extend(value)
        else:
            setattr(msg, key, value)
    with pytest.raises(InvalidRequest, match=why):
        JobSpec.from_proto(msg)
    with pytest.raises(InvalidRequest, match=why):
        check_spec(spec_to_dict(msg))


def test_real_jobs_stay_well_inside_the_ranges():
    for spec in (JobSpec(), JobSpec(rank=MAX_RANK), JobSpec(method="full"), JobSpec(grad_clip=0.0),
                 JobSpec(codec="cocktail", codec_p=0.1, codec_k=0.05, codec_bits=2, codec_bucket=512)):
        msg = spec.to_proto(node_pb2)
        assert JobSpec.from_proto(msg) == spec
        check_spec(spec_to_dict(msg))
