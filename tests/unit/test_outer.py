"""compression/outer.py: what the coordinator computes from a round's result frames is what
every member computed (issue 12), bit for bit, whatever the round's codec and optimizer:
the job's compressed rounds, warm-up rounds, rounds of a group of one."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pollinate.compression.outer import (
    OuterStep,
    OuterStepError,
    apply_results,
    state_checksum,
    state_from_bytes,
    state_to_bytes,
)
from pollinate.node.diloco import Contribution, DiLoCoMember, job_diloco_config
from pollinate.protocol.shared import JobSpec

NUMEL = 3001  # not a multiple of the group sizes: uneven shards


def one_round(members: list[DiLoCoMember], r: int) -> tuple[list[bytes], list[str]]:
    """A whole round among in-process members; the owners' result frames and the checksums."""
    n = len(members)
    g = torch.Generator().manual_seed(r)
    payloads = [m.contribute(m.local_start() - 1e-2 * torch.randn(NUMEL, generator=g), round_index=r, num_shards=n)
                for m in members]
    results = [members[j].aggregate([Contribution(sender=f"m{i}", tokens=10 + i, payload=payloads[i][j])
                                     for i in range(n)], round_index=r, shard_index=j, num_shards=n).payload
               for j in range(n)]
    return results, [m.apply(results, round_index=r, num_shards=n) for m in members]


@pytest.mark.parametrize("n, config", [
    (3, job_diloco_config(JobSpec(method="lora"))),  # cocktail, adapter outer lr
    (2, dataclasses.replace(job_diloco_config(JobSpec()), warmup_rounds=2)),  # rounds 1 and 2: fp32 frames
    (2, dataclasses.replace(job_diloco_config(JobSpec(method="lora")), outer_lr_warmup_rounds=2)),  # lr ramps
    (1, job_diloco_config(JobSpec(method="lora"))),  # a group of one: solo optimizer, int4 frame
    (1, dataclasses.replace(job_diloco_config(JobSpec(method="lora")), solo_codec="none")),  # ... fp32 frame
    (2, job_diloco_config(JobSpec(codec="int8"))),  # a dense codec: the DiLoCo paper's optimizer
])
def test_the_coordinators_rebuild_equals_every_members_state(n, config):
    initial = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
    members = [DiLoCoMember(initial, config) for _ in range(n)]
    theta, momentum = initial.clone(), torch.zeros(NUMEL)  # the coordinator's copy
    for r in (1, 2, 3):
        results, checksums = one_round(members, r)
        step = members[0].outer_settings(r, n)
        # what travels: OuterStepSettings (codec params as JSON) and the frames
        step = OuterStep(codec=step.codec, codec_params=json.loads(step.params_json()),
                         lr=step.lr, momentum=step.momentum, nesterov=step.nesterov)
        assert apply_results(theta, momentum, results, step, round_index=r) == checksums[0]
        assert len(set(checksums)) == 1
    assert torch.equal(theta, members[0].global_flat) and torch.equal(momentum, members[0].momentum)
    state = state_from_bytes(state_to_bytes(theta, momentum))
    assert state_checksum(state["global"], state["momentum"]) == checksums[0]


def test_bad_frames_change_nothing():
    theta, momentum = torch.ones(10), torch.zeros(10)
    step = OuterStep(codec="none", lr=1.0, momentum=0.9)
    with pytest.raises(OuterStepError, match="undecodable"):
        apply_results(theta, momentum, [b"junk"], step, round_index=1)
    short = step.make_codec().encode(torch.ones(9), seed=0)
    with pytest.raises(OuterStepError, match="wrong length"):
        apply_results(theta, momentum, [short], step, round_index=1)
    assert torch.equal(theta, torch.ones(10)) and torch.equal(momentum, torch.zeros(10))
    with pytest.raises(OuterStepError):
        state_from_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="lr"):
        OuterStep(codec="none", lr=0.0, momentum=0.9)


def test_cocktail_masks_are_drawn_once_and_the_cache_stays_bounded(monkeypatch):
    """A round uses each shard's mask ~6 times (members and the coordinator's rebuild): drawn
    once, shared read-only, and the cache never holds more than MASK_CACHE_BYTES."""
    import numpy as np

    from pollinate.compression import cocktail

    a = cocktail.make_mask(1000, 0.5, 7, cocktail.BERNOULLI)
    assert cocktail.make_mask(1000, 0.5, 7, cocktail.BERNOULLI) is a
    assert np.array_equal(a, cocktail.random_mask(1000, 0.5, 7)) and not a.flags.writeable
    monkeypatch.setattr(cocktail, "MASK_CACHE_BYTES", 2 * a.nbytes + 100)
    masks = [cocktail.make_mask(1000, 0.5, 100 + s, cocktail.BERNOULLI) for s in range(10)]
    assert cocktail._masks_bytes <= 2 * a.nbytes + 100
    assert all(np.array_equal(m, cocktail.random_mask(1000, 0.5, 100 + s)) for s, m in enumerate(masks))
