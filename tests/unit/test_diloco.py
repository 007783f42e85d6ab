"""DiLoCo outer step: bit-identical members, renormalisation, rejection, closed-form Nesterov."""

import numpy as np
import pytest
import torch

from pollinate.compression import get_codec
from pollinate.compression.outer import outer_step
from pollinate.node.diloco import (Contribution, DiLoCoConfig, DiLoCoMember, RoundError,
                                   exchange_in_process, mask_seed, screen, shard_bounds)


class Fp32:
    """Lossless test codec: raw fp32 bytes."""

    def encode(self, tensor, *, seed):
        return tensor.detach().float().numpy().tobytes()

    def decode(self, data, *, seed):
        return torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())


class SeededTopK(Fp32):
    """Lossy test codec: keeps the largest 25% of a seeded random half, then rounds to fp16."""

    def encode(self, tensor, *, seed):
        x = tensor.detach().float().reshape(-1)
        mask = torch.rand(x.numel(), generator=torch.Generator().manual_seed(seed)) < 0.5
        kept = torch.where(mask, x, torch.zeros_like(x))
        k = max(1, x.numel() // 8)
        out = torch.zeros_like(x)
        idx = kept.abs().topk(k).indices
        out[idx] = kept[idx].half().float()
        return super().encode(out, seed=seed)


def factory(codec, params):
    return Fp32() if codec == "none" else SeededTopK()


def make_members(n, numel=1000, **config):
    cfg = DiLoCoConfig(**config)
    theta = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    return [DiLoCoMember(theta, cfg, codec_factory=factory) for _ in range(n)]


def fake_training(members, round_index, scale=0.01):
    """Each member moves from where it starts by its own seeded step."""
    out = []
    for j, m in enumerate(members):
        g = torch.Generator().manual_seed(1000 * round_index + j)
        out.append(m.local_start() - scale * (1 + torch.randn(m.numel, generator=g)))
    return out


@pytest.mark.parametrize("residual_in_local", [False, True])
def test_members_end_bit_identical_after_rounds(residual_in_local):
    members = make_members(4, residual_in_local=residual_in_local, worker_ef_decay=0.9)
    start = members[0].global_flat.clone()
    for r in range(5):
        report = exchange_in_process(members, fake_training(members, r), [100, 200, 300, 400],
                                     round_index=r)
        assert len(set(report.checksums)) == 1
        assert report.rejected == {}
    for m in members[1:]:
        assert torch.equal(m.global_flat, members[0].global_flat)
        assert torch.equal(m.momentum, members[0].momentum)
    # the state moved (a no-op would also be "identical"), and the residuals are private
    assert float((members[0].global_flat - start).abs().max()) > 0.01
    assert not torch.equal(members[0].residual, members[1].residual)


def test_closed_form_nesterov_with_one_member_and_no_codec():
    (m,) = make_members(1, codec="none", outer_lr=0.7, outer_momentum=0.9, solo_codec="none")
    theta0 = m.global_flat.clone()
    local0 = theta0 - 0.1
    exchange_in_process([m], [local0], [1], round_index=0)
    d0 = theta0 - local0  # momentum buffer = d0; Nesterov direction d0 + 0.9 d0
    theta1 = theta0 - 0.7 * (d0 + 0.9 * d0)
    assert torch.allclose(m.global_flat, theta1, atol=1e-6, rtol=0)
    local1 = theta1 + 0.05 * torch.arange(m.numel) / m.numel
    exchange_in_process([m], [local1], [1], round_index=1)
    d1 = theta1 - local1
    buf = 0.9 * d0 + d1
    assert torch.allclose(m.global_flat, theta1 - 0.7 * (d1 + 0.9 * buf), atol=1e-6, rtol=0)
    assert torch.allclose(m.momentum, buf, atol=1e-7, rtol=0)


def test_a_lone_member_sends_nothing_lossy_and_takes_the_solo_outer_step():
    """A group of one: the job's lossy codec and outer lr 1.6 would only hurt (nothing is
    sent); the round is lossless with the solo optimizer, and residuals end at zero."""
    (m,) = make_members(1, outer_lr=1.6, outer_momentum=0.8, solo_outer_optimizer=(0.7, 0.9), solo_codec="none")
    theta0 = m.global_flat.clone()
    local0 = theta0 - 0.01 * torch.arange(m.numel) / m.numel
    report = exchange_in_process([m], [local0], [1], round_index=0)
    d0 = theta0 - local0
    assert torch.allclose(m.global_flat, theta0 - 0.7 * (d0 + 0.9 * d0), atol=1e-6, rtol=0)
    assert not m.residual.any() and not m.owner_residual.any() and report.rejected == {}
    # the same member in a group of two compresses with the job's codec again
    pair = make_members(2, outer_lr=1.6, outer_momentum=0.8)
    exchange_in_process(pair, fake_training(pair, 0), [1, 1], round_index=0)
    assert pair[0].residual.any()


def test_a_lone_members_int8_frame_keeps_what_it_rounds_off_for_the_next_round():
    """The default solo codec (int8: its frame goes to the coordinator only) is lossy; the
    worker's error feedback holds the difference, so nothing of the update is lost: after a
    round, θ_global plus the residual's outer step equals the fp32 round's θ_global."""
    theta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    lossy, exact = (DiLoCoMember(theta, DiLoCoConfig(solo_codec=c)) for c in ("int8", "none"))
    assert lossy.outer_settings(1, 1).codec == "int8" and lossy.outer_settings(1, 2).codec == "cocktail"
    local = theta - 0.01 * torch.randn(1000, generator=torch.Generator().manual_seed(1))
    payload = lossy.contribute(local, round_index=1, num_shards=1)
    assert len(payload[0]) < 0.3 * len(exact.contribute(local, round_index=1, num_shards=1)[0])
    exchange_in_process([lossy], [local], [1], round_index=1)
    exchange_in_process([exact], [local], [1], round_index=1)
    rel = float((lossy.global_flat - exact.global_flat).norm() / (exact.global_flat - theta).norm())
    assert 0 < rel < 0.01  # int8: within 1% of the fp32 step, and not equal to it
    sent = get_codec("int8").decode(payload[0]).reshape(-1)  # what the frame carried
    assert torch.allclose(lossy.residual, (theta - local) - sent, atol=1e-7)  # the rest: kept here
    assert lossy.residual.abs().max() > 0 and torch.equal(lossy.local_start(), lossy.global_flat - lossy.residual)
    with pytest.raises(ValueError, match="solo_codec"):
        DiLoCoConfig(solo_codec="cocktail")


def test_outer_step_matches_torch_sgd():
    gen = torch.Generator().manual_seed(0)  # unseeded draws made the fp32 rounding gap vary
    theta = torch.randn(50, generator=gen)
    grads = [torch.randn(50, generator=gen) for _ in range(3)]
    ref = torch.nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    mine, buf = theta.clone(), torch.zeros(50)
    for g in grads:
        ref.grad = g.clone()
        sgd.step()
        outer_step(mine, buf, g, lr=0.7, momentum_coef=0.9, nesterov=True)
    # torch's SGD and outer_step order their fp32 operations differently: equal to rounding
    # (values reach ~10, where one ulp is ~1e-6)
    assert torch.allclose(mine, ref.detach(), atol=1e-6, rtol=1e-6)


def test_member_dropping_out_renormalises_by_tokens():
    members = make_members(3, codec="none", outer_momentum=0.0, outer_lr=1.0)
    theta = members[0].global_flat.clone()
    a, b = theta - 1.0, theta - 3.0  # pseudo-gradients 1 and 3
    pa = members[0].contribute(a, round_index=0, num_shards=3)
    pb = members[1].contribute(b, round_index=0, num_shards=3)
    # member 2 never shows up; owner 0 averages what it has: (100*1 + 300*3) / 400 = 2.5
    result = members[0].aggregate(
        [Contribution(sender="a", tokens=100, payload=pa[0]),
         Contribution(sender="b", tokens=300, payload=pb[0])],
        round_index=0, shard_index=0, num_shards=3)
    avg = Fp32().decode(result.payload, seed=0)
    assert result.accepted == ("a", "b")
    assert torch.allclose(avg, torch.full_like(avg, 2.5))


def test_poisoned_pseudo_gradient_is_rejected_and_round_completes():
    members = make_members(4, codec="none", outer_momentum=0.0, outer_lr=1.0)
    theta = members[0].global_flat.clone()
    locals_ = [theta - 0.01 * (j + 1) for j in range(4)]
    locals_[2] = theta - 1e6 * 0.03  # x1e6 poisoned
    report = exchange_in_process(members, locals_, [1, 1, 1, 1], round_index=0)
    assert set(report.rejected) == {"m2"}
    assert "norm" in report.rejected["m2"]
    # plain averaging step over the 3 honest members: mean pseudo-gradient (0.01+0.02+0.04)/3
    assert torch.allclose(members[0].global_flat, theta - 0.07 / 3, atol=1e-6, rtol=0)
    assert len(set(report.checksums)) == 1


def test_screen_rejects_nan_wrong_length_and_outlier():
    good = {f"g{i}": torch.full((10,), 1.0 + 0.1 * i) for i in range(3)}
    bad = {"nan": torch.full((10,), float("nan")), "short": torch.ones(9),
           "big": torch.full((10,), 50.0)}
    accepted, rejected = screen({**good, **bad}, numel=10, norm_factor=10.0)
    assert accepted == ["g0", "g1", "g2"]
    assert rejected["nan"] == "NaN/Inf in pseudo-gradient"
    assert rejected["short"].startswith("length 9")
    assert rejected["big"].startswith("norm")
    # two members: the poisoned one is judged against the honest one, not vice versa
    accepted, rejected = screen({"a": torch.ones(4), "b": torch.ones(4) * 1e6}, numel=4,
                                norm_factor=10.0)
    assert accepted == ["a"] and list(rejected) == ["b"]


def test_undecodable_and_all_rejected():
    (m,) = make_members(1, codec="none")
    with pytest.raises(RoundError, match="no acceptable"):
        m.aggregate([Contribution(sender="x", tokens=5, payload=b"\x00\x01\x02")],
                    round_index=0, shard_index=0, num_shards=1)


def test_abort_changes_nothing_and_bad_result_raises():
    members = make_members(2)
    before = [(m.checksum(), m.residual.clone(), m.owner_residual.clone()) for m in members]
    locals_ = fake_training(members, 0)
    payloads = [m.contribute(x, round_index=0, num_shards=2) for m, x in zip(members, locals_)]
    members[0].aggregate([Contribution(sender=f"m{i}", tokens=1, payload=payloads[i][0])
                          for i in range(2)], round_index=0, shard_index=0, num_shards=2)
    with pytest.raises(RoundError):
        members[0].apply([b"", b""], round_index=0, num_shards=2)
    for m, (checksum, residual, owner) in zip(members, before):
        m.abort()
        assert m.checksum() == checksum
        assert torch.equal(m.residual, residual) and torch.equal(m.owner_residual, owner)


def test_error_feedback_keeps_what_was_not_sent():
    (m,) = make_members(1, owner_error_feedback=False, outer_momentum=0.0, outer_lr=1.0,
                        solo_outer_optimizer=None)  # a group of one that still compresses
    theta = m.global_flat.clone()
    local = theta - torch.linspace(-1, 1, m.numel)
    exchange_in_process([m], [local], [1], round_index=0)
    sent = theta - m.global_flat
    # transmitted + residual = the pseudo-gradient (up to fp16 rounding of what was sent)
    assert torch.allclose(sent + m.residual, theta - local, atol=1e-3, rtol=0)
    assert 0 < int((sent != 0).sum()) <= m.numel // 8


def test_shard_bounds_and_config_validation():
    assert shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(ValueError, match="outer_momentum"):
        DiLoCoConfig(outer_momentum=1.0)
    with pytest.raises(ValueError, match="inner_steps"):
        DiLoCoConfig(inner_steps=0)
    with pytest.raises(ValueError, match="solo_outer_optimizer"):
        DiLoCoConfig(solo_outer_optimizer=(0.7, 1.0))


def test_with_the_registry_cocktail_codec_members_agree_and_stale_frames_are_rejected():
    cfg = DiLoCoConfig(codec_params={"p": 0.5, "k": 0.2, "bits": 3})
    theta = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    members = [DiLoCoMember(theta, cfg) for _ in range(3)]  # production codec factory
    for r in range(3):
        report = exchange_in_process(members, fake_training(members, r), [1, 1, 1],
                                     round_index=r)
        assert len(set(report.checksums)) == 1 and report.rejected == {}
        # 3 members x 1/3 of 5000 fp32 values would be 4 x 2/3 x 20000 = 53 kB dense
        assert max(report.bytes_per_member) < 53_000 / 4
    # a frame compressed for round 2 replayed in round 3: the codec refuses the wrong seed
    stale = members[1].contribute(fake_training(members, 3)[1], round_index=2, num_shards=3)
    fresh = members[0].contribute(fake_training(members, 3)[0], round_index=3, num_shards=3)
    result = members[0].aggregate(
        [Contribution(sender="m0", tokens=1, payload=fresh[0]),
         Contribution(sender="m1", tokens=1, payload=stale[0])],
        round_index=3, shard_index=0, num_shards=3)
    assert result.accepted == ("m0",)
    assert result.rejected["m1"].startswith("undecodable")


def test_cycled_cocktail_members_agree_and_each_coordinate_moves_within_ceil_one_over_p():
    # no outer momentum: a coordinate moves only in a round whose mask holds it
    cfg = DiLoCoConfig(outer_momentum=0.0, codec_params={"p": 0.5, "k": 1.0, "bits": 1,
                                                         "bucket": 64, "cycled": True})
    theta = torch.randn(6000, generator=torch.Generator().manual_seed(1))
    members = [DiLoCoMember(theta, cfg) for _ in range(3)]
    moved = torch.zeros(6000, dtype=torch.bool)
    for r in range(2):  # p = 1/2: two consecutive rounds send complementary halves
        before = members[0].global_flat.clone()
        report = exchange_in_process(members, fake_training(members, r), [1, 1, 1],
                                     round_index=r)
        assert len(set(report.checksums)) == 1 and report.rejected == {}
        changed = members[0].global_flat != before
        if r == 0:
            assert 0.45 < float(changed.float().mean()) < 0.55
        moved |= changed
    assert bool(moved.all())
    with pytest.raises(ValueError, match="round_index"):
        mask_seed(-1, 0)
