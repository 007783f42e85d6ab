"""Packed steps of several sessions (node/packed_forward.py) equal each session run alone.

Sessions with different cache lengths, prefills of different lengths packed with one-token
decode steps, and a session joining mid-way: each session's outputs and cache must match
the same session stepped alone through `SpanModule.forward`, and its greedy tokens the local model's.
"""

from __future__ import annotations

import pytest
import torch

from pollinate.node.packed_forward import PackedStep, forward_packed, packable
from pollinate.node.span import SpanError

# fp32; the packed projections sum the same terms as alone but may block them differently
# (GEMM for T rows vs GEMV for one), so the last bits may differ: relative to the hidden
# states' scale (~25 here), 1e-5 is ~80 float32 ulps; measured ~2e-6.
RTOL = 1e-5


@pytest.fixture(scope="module")
def span(tiny_model_files):
    return tiny_model_files.load_span(0, 4)


def _hidden(seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, seq, 64, generator=g)


def _pos(start: int, seq: int) -> torch.Tensor:
    return torch.arange(start, start + seq).unsqueeze(0)


@torch.inference_mode()
def test_packed_steps_equal_each_session_alone(span):
    prompts = [3, 7, 1, 12]  # different cache lengths from the first decode step on
    alone = [span.new_cache(max_length=64) for _ in prompts]
    packed = [span.new_cache(max_length=64) for _ in prompts]
    lengths = [0] * len(prompts)
    # Round 0: four prefills of different lengths in one pass; then decode steps, where
    # session 2 brings a 4-token chunk in round 2 (a prefill packed with decodes).
    rounds = [prompts, [1, 1, 1, 1], [1, 1, 4, 1], [1, 1, 1, 1]]
    worst = 0.0
    for r, seqs in enumerate(rounds):
        steps, expected = [], []
        for i, seq in enumerate(seqs):
            h = _hidden(seq, seed=100 * r + i)
            expected.append(span(h, _pos(lengths[i], seq), cache=alone[i]))
            steps.append(PackedStep(cache=packed[i], hidden=h, position_ids=_pos(lengths[i], seq)))
            lengths[i] += seq
        got = forward_packed(span, steps)
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            worst = max(worst, (g - e).abs().max().item() / e.abs().max().item())
    assert worst <= RTOL
    for a, p, n in zip(alone, packed, lengths):
        assert p.length == a.length == n
        for la, lp in zip(a.kv.layers, p.kv.layers):
            assert la.keys.shape == lp.keys.shape == (1, 2, n, 16)
            assert (la.keys - lp.keys).abs().max().item() <= RTOL * la.keys.abs().max().item()
            assert (la.values - lp.values).abs().max().item() <= RTOL * la.values.abs().max().item()


@torch.inference_mode()
def test_one_packed_session_is_bitwise_alone(span):
    """With one session the pass is the same computation as SpanModule.forward: equal to the bit,
    so any difference with several sessions comes from the shared matrix products alone."""
    alone, packed = span.new_cache(max_length=32), span.new_cache(max_length=32)
    position = 0
    for seed, seq in enumerate([5, 1, 1, 3, 1]):
        h = _hidden(seq, seed)
        expected = span(h, _pos(position, seq), cache=alone)
        (got,) = forward_packed(span, [PackedStep(cache=packed, hidden=h, position_ids=_pos(position, seq))])
        position += seq
        assert torch.equal(got, expected)


@torch.inference_mode()
def test_packing_a_wrong_position_changes_nothing(span):
    ok, bad = span.new_cache(max_length=16), span.new_cache(max_length=16)
    forward_packed(span, [PackedStep(cache=ok, hidden=_hidden(3, 1), position_ids=_pos(0, 3)),
                          PackedStep(cache=bad, hidden=_hidden(2, 2), position_ids=_pos(0, 2))])
    with pytest.raises(SpanError, match="do not follow"):
        forward_packed(span, [PackedStep(cache=ok, hidden=_hidden(1, 3), position_ids=_pos(3, 1)),
                              PackedStep(cache=bad, hidden=_hidden(1, 4), position_ids=_pos(5, 1))])
    # checked before anything ran: neither cache moved
    assert (ok.length, bad.length) == (3, 2)
    assert ok.kv.layers[0].keys.shape[2] == 3


@torch.inference_mode()
def test_the_attention_implementation_is_restored(span):
    before = span.config._attn_implementation
    cache = span.new_cache(max_length=8)
    forward_packed(span, [PackedStep(cache=cache, hidden=_hidden(2, 5), position_ids=_pos(0, 2))])
    assert span.config._attn_implementation == before


def test_packable_names_what_runs_alone(span):
    assert packable(span, None, 1) is None
    assert "batch size 2" in packable(span, None, 2)


@torch.inference_mode()
def test_packed_greedy_sessions_equal_the_local_model(tiny_model_files, tiny_reference_model):
    """Three sessions decoding greedily together, through the whole tiny model, give the
    reference model's greedy tokens for their prompts."""
    client, span = tiny_model_files.load_client_part(), tiny_model_files.load_span(0, 4)
    prompts = [[1, 5, 9, 33, 70], [1, 200, 17], [1, 44, 45, 46, 47, 48, 49, 50, 51]]
    n = 10
    expected = [tiny_reference_model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                                              do_sample=False)[0, len(p):].tolist() for p in prompts]
    caches = [span.new_cache(max_length=32) for _ in prompts]
    steps_ids = [torch.tensor([p]) for p in prompts]
    positions = [0] * len(prompts)
    got = [[] for _ in prompts]
    for _ in range(n):
        steps = []
        for i, ids in enumerate(steps_ids):
            steps.append(PackedStep(cache=caches[i], hidden=client.embed(ids), position_ids=_pos(positions[i], ids.shape[1])))
            positions[i] += ids.shape[1]
        outs = forward_packed(span, steps)
        for i, out in enumerate(outs):
            token = client.logits(out)[:, -1].argmax(-1, keepdim=True)
            got[i].append(token.item())
            steps_ids[i] = token
    assert got == expected


def test_span_server_packs_concurrent_steps_and_isolates_a_bad_one(tiny_model_files):
    """Through SpanServer.step: steps that queue together run as one pass (the worker's
    counters say so) with the outputs of running alone; when one step's cache refuses the
    pack, the pass falls back to running each alone and only that step fails."""
    import asyncio
    import threading

    from pollinate.node.config import ServingConfig
    from pollinate.node.sessions import SessionConfig
    from pollinate.node.span_server import SpanServer
    from pollinate.protocol.errors import InvalidRequest

    span = tiny_model_files.load_span(0, 4)
    reference = tiny_model_files.load_span(0, 4)

    async def main():
        server = SpanServer(span, model_id="tiny", num_blocks=4, hidden_size=64, serving=ServingConfig(),
                            sessions=SessionConfig())
        try:
            sessions = [server.open_session(f"s{i}", max_length=16, batch_size=1) for i in range(3)]
            alone = [reference.new_cache(max_length=16) for _ in sessions]
            inputs = [[_hidden(seq, 10 * i + r) for r, seq in enumerate((4 + i, 1, 1))] for i in range(3)]

            async def round_(r, corrupt=None):
                if corrupt is not None:  # the cache disagrees with its session
                    cache = sessions[corrupt].cache
                    cache.next_positions = cache.next_positions + 100
                release = threading.Event()
                blocker = asyncio.ensure_future(server.run_torch(release.wait, 10))  # steps queue behind it
                positions = [s.position for s in sessions]
                steps = [asyncio.ensure_future(server.step(s, inputs[i][r], positions[i])) for i, s in enumerate(sessions)]
                await asyncio.sleep(0.05)
                release.set()
                await blocker
                return await asyncio.gather(*steps, return_exceptions=True)

            for r in range(2):
                passes = server.worker.stats.passes
                outs = await round_(r)
                assert server.worker.stats.passes == passes + 1  # one pass for the three
                for i, out in enumerate(outs):
                    with torch.inference_mode():
                        expected = reference(inputs[i][r], _pos(sessions[i].position - inputs[i][r].shape[1],
                                                                 inputs[i][r].shape[1]), cache=alone[i])
                    assert (out - expected).abs().max().item() <= RTOL * expected.abs().max().item()
            outs = await round_(2, corrupt=1)
            assert isinstance(outs[1], InvalidRequest) and "do not follow" in str(outs[1])
            for i in (0, 2):
                with torch.inference_mode():
                    expected = reference(inputs[i][2], _pos(sessions[i].position - 1, 1), cache=alone[i])
                assert (outs[i] - expected).abs().max().item() <= RTOL * expected.abs().max().item()
        finally:
            await server.shutdown()

    asyncio.run(main())
