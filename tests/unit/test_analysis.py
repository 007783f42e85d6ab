"""client/analysis.py and client/checkpoints.py on the tiny model: the verbatim test agrees
with greedy generation, per-example losses are training's loss, a checkpoint's flat state
becomes an adapter that peft loads to the same logits as the node's adapter holding that
state, and flat_from_peft inverts the export exactly."""

from __future__ import annotations

import pytest
import torch

from pollinate.client import analysis
from pollinate.client.checkpoints import JobCheckpoint, SpanCheckpoint, flat_from_peft, peft_state, span_adapter
from pollinate.client.training_data import IGNORE, Example, causal_lm_loss, collate
from pollinate.protocol.shared import JobSpec


def greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_verbatim_is_greedy_decoding_and_loss_is_trainings(tiny_reference_model):
    model = tiny_reference_model
    prompt = [5, 17, 42, 9]
    recalled = greedy(model, prompt, 6)
    wrong = recalled[:3] + [(recalled[3] + 1) % 256] + recalled[4:]
    examples = [Example(input_ids=prompt + recalled, labels=[IGNORE] * 4 + recalled),
                Example(input_ids=prompt + wrong, labels=[IGNORE] * 4 + wrong),
                # a text example: every token labelled, judged on its second half
                Example(input_ids=prompt + recalled[:4], labels=prompt + recalled[:4])]
    scores = analysis.score(model, examples, pad_id=0, batch_size=2)
    assert scores.verbatim == [True, False, True]
    assert scores.verbatim_rate == pytest.approx(2 / 3)
    for e, loss in zip(examples, scores.losses):
        ids, labels = collate([e], 0)
        with torch.no_grad():
            assert loss == pytest.approx(float(causal_lm_loss(model(input_ids=ids).logits, labels)), rel=1e-5)


def test_checkpoint_to_peft_model_matches_the_node_adapter(tiny_model_files, tiny_reference_model):
    spec = JobSpec(method="lora", rank=4, alpha=8.0, seed=3)
    numel = sum(p.numel() for p in span_adapter(spec, tiny_model_files, (0, 2)).parameters())
    g = torch.Generator().manual_seed(0)
    spans = tuple(SpanCheckpoint(span=s, round=r, checksum="-", theta=torch.randn(numel, generator=g) * 0.1)
                  for s, r in (((0, 2), 7), ((2, 4), 6)))
    point = JobCheckpoint(job="j", asked=7, spec=spec, spans=spans)
    state = peft_state(point, tiny_model_files)
    for s in spans:  # the export inverts to exactly the flat state
        assert torch.equal(flat_from_peft(spec, tiny_model_files, s.span, state), s.theta)
    model = analysis.model_at(point, tiny_model_files, tiny_reference_model, base_model="tiny")
    ids = torch.tensor([[3, 9, 27, 81, 243]])
    # the same adapters on the node's own blocks, run through the spans
    from pollinate.node.adapters import AdapterHost

    part = tiny_model_files.load_client_part()
    h = part.embed(ids)
    for s in spans:
        blocks = tiny_model_files.load_span(*s.span)
        host = AdapterHost()
        host.attach(blocks)
        adapter = span_adapter(spec, tiny_model_files, s.span, s.theta)
        with torch.no_grad(), host.use(adapter):
            h = blocks(h)
    with torch.no_grad():
        expected = part.logits(h)
        got = model(input_ids=ids).logits
        base = tiny_reference_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter changed something


def rows():
    return [{"round": 1, "train_loss": 2.0, "heldout_loss": 2.1, "gap": 0.1, "verbatim_train": 0.0,
             "verbatim_heldout": 0.0, "train_verbatim": []},
            {"round": 4, "train_loss": 1.0, "heldout_loss": 2.0, "gap": 1.0, "verbatim_train": 0.5,
             "verbatim_heldout": 0.0, "train_verbatim": [3, 1]},
            {"round": 8, "train_loss": 0.2, "heldout_loss": 2.5, "gap": 2.3, "verbatim_train": 1.0,
             "verbatim_heldout": 0.0, "train_verbatim": [0, 1, 2, 3]}]


def test_report_and_first_learned():
    assert analysis.first_learned(rows()) == [(1, 4), (3, 4), (0, 8), (2, 8)]
    text = analysis.report("j", rows())
    assert "generalisation gap grew: 0.100 at round 1 -> 2.300 at round 8" in text
    assert "#1 (round 4), #3 (round 4), #0 (round 8)" in text


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="analyze --plot needs matplotlib (pip install 'pollinate[plot]')")
    out = analysis.plot("j", rows(), tmp_path / "j.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
