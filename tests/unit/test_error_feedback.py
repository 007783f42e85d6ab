"""Error feedback: the decoded stream tracks the inputs; without it, it drifts away."""

from __future__ import annotations

import math

import pytest
import torch

from pollinate.compression import CompressionError, get_codec
from pollinate.compression.error_feedback import ErrorFeedback, ErrorFeedbackConfig


def heavy_tailed(n: int, generator: torch.Generator) -> torch.Tensor:
    chi2 = torch.randn(3, n, generator=generator).square().sum(0)
    return torch.randn(n, generator=generator) / (chi2 / 3).sqrt()


def test_sum_of_decoded_messages_tracks_sum_of_inputs_only_with_error_feedback():
    n, rounds = 2048, 400
    gen = torch.Generator().manual_seed(0)
    drift = heavy_tailed(n, gen)  # a persistent direction, as in successive pseudo-gradients
    codec = get_codec("cocktail")  # CocktailSGD defaults: 2% of coordinates per message
    feedback = ErrorFeedback(codec)
    sent = torch.zeros(n, dtype=torch.float64)
    with_ef, without_ef = sent.clone(), sent.clone()
    residual_norms, gaps_without = [], {}
    for t in range(rounds):
        x = drift + 0.5 * torch.randn(n, generator=gen)
        sent += x
        with_ef += codec.decode(feedback.step("w", x, seed=t), seed=t).double()
        without_ef += codec.decode(codec.encode(x, seed=t), seed=t).double()
        residual = feedback.residual("w").double()
        # nothing lost: what was sent = what was decoded + what is still pending
        assert torch.allclose(sent, with_ef + residual, rtol=1e-4, atol=1e-2)
        residual_norms.append(float(residual.norm()))
        gaps_without[t + 1] = float((sent - without_ef).norm())

    # the residual stays bounded: no larger in the last 100 rounds than in rounds 100-200
    assert max(residual_norms[300:]) <= 1.5 * max(residual_norms[100:200])
    assert float((sent - with_ef).norm() / sent.norm()) < 0.08
    # without error feedback 98% of the signal is dropped every round and the gap grows
    # linearly with the number of rounds
    assert gaps_without[400] / sent.norm() > 0.8
    assert gaps_without[400] >= 3.5 * gaps_without[100]


def test_compress_changes_nothing_until_commit():
    feedback = ErrorFeedback(get_codec("int8"))
    feedback.step("a", torch.randn(100))
    before = feedback.residual("a").clone()
    pending = feedback.compress("a", torch.randn(100) * 3)
    assert torch.equal(feedback.residual("a"), before)  # an aborted round leaves no trace
    feedback.commit(pending)
    assert torch.equal(feedback.residual("a"), pending.residual)
    assert torch.allclose(pending.decoded + pending.residual,
                          pending.decoded + feedback.residual("a"))


def test_bad_input_changes_nothing():
    feedback = ErrorFeedback(get_codec("cocktail"))
    feedback.step("a", torch.randn(64))
    before = feedback.state_dict()
    bad = torch.randn(64)
    bad[3] = math.nan
    with pytest.raises(CompressionError, match="NaN/Inf"):
        feedback.step("a", bad)
    with pytest.raises(CompressionError, match="shape"):
        feedback.step("a", torch.randn(65))
    assert torch.equal(feedback.residual("a"), before["a"])


def test_residuals_are_per_name_and_survive_state_dict():
    feedback = ErrorFeedback(get_codec("cocktail", p=0.5, k=0.5))
    feedback.step("a", torch.randn(32), seed=1)
    feedback.step("b", torch.randn(8).to(torch.bfloat16), seed=1)
    assert feedback.residual("b").dtype == torch.float32 and feedback.residual("b").shape == (8,)
    other = ErrorFeedback(feedback.codec)
    other.load_state_dict(feedback.state_dict())
    x = torch.randn(32)
    assert other.step("a", x, seed=2) == feedback.step("a", x, seed=2)
    feedback.reset("a")
    assert feedback.residual("a") is None and feedback.residual("b") is not None


def test_decay_config_is_validated_and_applied():
    with pytest.raises(ValueError, match="decay .*1.5"):
        ErrorFeedbackConfig(decay=1.5)
    feedback = ErrorFeedback(get_codec("none"), ErrorFeedbackConfig(decay=0.0))
    x = torch.randn(10)
    assert torch.equal(get_codec("none").decode(feedback.step("a", x)), x)  # lossless: e = 0
