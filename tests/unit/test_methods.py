"""The methods without a reference library that runs beside transformers 5 (issue 14):
bottleneck adapters, LoReFT and GaLore, on spans against the same training run locally.

"Local" is the whole transformers model running its own forward (LlamaModel's loop, not
Span's): for bottleneck and LoReFT the job's adapter is hooked onto it (AdapterHost attaches
to `model.model`, whose module names are the span's); for GaLore its decoder weights train
under GaLoreAdamW, as `full` trains under AdamW. The spans' exported files, loaded by
client/method_export.py onto a plain transformers model, must give the spans' logits.
GaLoreAdamW itself is checked against an independent transcription of the paper's
Algorithm 1.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pollinate.client.method_export import load_method_adapter, write_method_adapter
from pollinate.client.training_data import causal_lm_loss
from pollinate.node.adapters import AdapterHost
from pollinate.node.adapters.galore import GaLoreAdamW
from pollinate.node.training import backward_step, make_job
from pollinate.protocol.shared import JobSpec
from test_training import batches

SPANS = [(0, 1), (1, 3), (3, 4)]
SPECS = {"bottleneck": dict(rank=4), "reft": dict(rank=2), "galore": dict(rank=2)}


def train_spans(files, spec, data, micro):
    host = AdapterHost()
    part = files.load_client_part()
    spans = [files.load_span(s, e) for s, e in SPANS]
    jobs = [make_job("j", spec, span, host) for span in spans]
    init = {k: v for job in jobs for k, v in job.adapter.peft_state().items()}
    for ids in data:  # the trainer's arithmetic: Forward down the chain, Backward up it
        with torch.no_grad():
            h = part.embed(ids)
        inputs = []
        for job, span in zip(jobs, spans):
            inputs.append(h)
            with torch.no_grad(), host.use(job.adapter):
                h = span(h)
        out = h.detach().requires_grad_(True)
        causal_lm_loss(part.logits(out), ids).backward()
        grad = out.grad
        for job, span, x in zip(reversed(jobs), reversed(spans), reversed(inputs)):
            grad = backward_step(job, span, host, x, grad)

    def logits(ids):
        with torch.no_grad():
            h = part.embed(ids)
            for job, span in zip(jobs, spans):
                with host.use(job.adapter):
                    h = span(h)
            return part.logits(h)

    return jobs, init, logits


def local_run(files, reference_model, spec, data, micro):
    """The same training on the whole transformers model: (initial state, final state, loss per step)."""
    model = copy.deepcopy(reference_model)
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.method == "prefix-tuning":  # PEFT, from the spans' initial prefix
        from pollinate.node.adapters.prefix import peft_prompt_embeddings

        whole = make_job("ref", spec, files.load_span(0, 4), AdapterHost())
        init = peft_prompt_embeddings(whole.adapter.peft_state(), 4)
        model, weight = peft_prefix_model(reference_model, spec, init["prompt_embeddings"])
        opt = torch.optim.AdamW([weight], lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
        state = lambda: {"prompt_embeddings": weight.detach()}
        scope = torch.enable_grad
    elif spec.method == "llama-adapter":  # PEFT's adaption prompt, from the spans' initial state
        from peft import AdaptionPromptConfig, get_peft_model

        init = make_job("ref", spec, files.load_span(0, 4), AdapterHost()).adapter.peft_state()
        model = get_peft_model(model, AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=spec.num_virtual_tokens,
                                                           adapter_layers=spec.rank))
        named = {k: p for k, p in model.named_parameters() if p.requires_grad}
        assert set(named) == set(init), sorted(set(named) ^ set(init))
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(init[k])
        opt = torch.optim.AdamW(list(named.values()), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
        state = lambda: {k: p.detach() for k, p in named.items()}
        scope = torch.enable_grad
    elif spec.method == "galore":
        named = {k: p for k, p in model.named_parameters() if k.startswith("model.layers.")}
        for p in named.values():
            p.requires_grad_(True)
        init = {k: p.detach().clone() for k, p in named.items()}
        opt = GaLoreAdamW(list(named.values()), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                          rank=spec.rank)
        state = lambda: {k: p.detach() for k, p in named.items()}
        scope = torch.enable_grad
    else:  # the same adapter, built on the whole model as one span, hooked onto transformers' LlamaModel
        host = AdapterHost()
        whole = make_job("ref", spec, files.load_span(0, 4), host)
        init = whole.adapter.peft_state()
        host.attach(model.model)
        opt = whole.optimizer
        state = whole.adapter.peft_state
        scope = lambda: host.use(whole.adapter)
    losses = []
    for i in range(0, len(data), micro):
        with scope():
            step = [causal_lm_loss(model(ids).logits, ids) for ids in data[i:i + micro]]
            for loss in step:
                (loss / micro).backward()
        losses.append(sum(float(x) for x in step) / micro)
        opt.step()
        opt.zero_grad()
    return init, state(), losses


@pytest.mark.parametrize("method", sorted(SPECS))
def test_spans_match_local_and_export_reloads(tmp_path, tiny_model_files, tiny_reference_model, method):
    micro = 2
    spec = JobSpec(method=method, lr=1e-2, micro_batches=micro, grad_clip=0.0, seed=3, **SPECS[method])
    data = batches(3 * micro)
    jobs, init, swarm_logits = train_spans(tiny_model_files, spec, data, micro)
    ref_init, ref, _ = local_run(tiny_model_files, tiny_reference_model, spec, data, micro)
    assert set(ref_init) == set(init) and all(torch.equal(ref_init[k], init[k]) for k in init), \
        "the initial state depends on how the model is split"

    got = {k: v for job in jobs for k, v in job.adapter.peft_state().items()}
    assert all(job.inner_steps == 3 for job in jobs)
    moved = max(float((got[k] - init[k]).abs().max()) for k in got)
    diff = max(float((got[k] - ref[k]).abs().max()) for k in got)
    print(f"{method}: moved {moved:.3e}, spans vs local max |diff| {diff:.3e}")
    assert moved > 1e-3, "the job did not train"
    assert diff <= 1e-5, diff

    ids = batches(1, seed=7)[0]
    plain = copy.deepcopy(tiny_reference_model)
    if method == "galore":  # exported as a full checkpoint (client/peft_export.py): the weights themselves
        plain.load_state_dict(got, strict=False)
    else:
        write_method_adapter(tmp_path / method, got, spec, base_model="tiny", model_config=tiny_model_files.config)
        load_method_adapter(plain, tmp_path / method)
    with torch.no_grad():
        gap = float((plain(ids).logits - swarm_logits(ids)).abs().max())
        base_gap = float((tiny_reference_model(ids).logits - swarm_logits(ids)).abs().max())
    print(f"{method}: exported vs spans logits {gap:.3e} (base model {base_gap:.3e})")
    assert gap <= 1e-5, gap
    assert base_gap > 1e-3


def test_bottleneck_starts_as_the_identity_and_places_follow_targets(tiny_model_files):
    span = tiny_model_files.load_span(0, 2)
    host = AdapterHost()
    x = torch.randn(1, 5, span.hidden_size, generator=torch.Generator().manual_seed(0))
    job = make_job("j", JobSpec(method="bottleneck", rank=4), span, host)
    with torch.no_grad():
        base = span(x)
        with host.use(job.adapter):
            assert torch.equal(span(x), base)  # up-projection zeros: exactly the base span
    assert JobSpec(method="bottleneck").targets == ("o_proj", "down_proj")
    pfeiffer = make_job("p", JobSpec(method="bottleneck", rank=4, targets=("down_proj",)), span, host)
    assert all(".output_adapters." in k for k in pfeiffer.adapter.peft_state())
    with pytest.raises(ValueError, match="after o_proj and/or down_proj"):
        make_job("q", JobSpec(method="bottleneck", targets=("q_proj",)), span, host)


def test_reft_rotation_stays_orthonormal(tiny_model_files):
    span = tiny_model_files.load_span(0, 1)
    host = AdapterHost()
    job = make_job("j", JobSpec(method="reft", rank=3, lr=5e-2, grad_clip=0.0), span, host)
    x = torch.randn(2, 6, span.hidden_size, generator=torch.Generator().manual_seed(1))
    before = job.adapter.peft_state()["model.layers.0.reft.rotate_layer"]
    for _ in range(3):
        backward_step(job, span, host, x, torch.randn_like(x))
    r = job.adapter.peft_state()["model.layers.0.reft.rotate_layer"]
    assert float((r - before).abs().max()) > 1e-3
    assert float((r.T @ r - torch.eye(3)).abs().max()) < 1e-5


def paper_galore_adam(w0: torch.Tensor, grads: list[torch.Tensor], *, lr, b1, b2, eps, wd, rank, gap, scale):
    """Algorithm 1 of Zhao et al. 2024 (GaLore), written out on its own, float64."""
    w = w0.double().clone()
    m_dim, n_dim = w.shape
    M = V = P = None
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if (t - 1) % gap == 0:
            u, s, vh = torch.linalg.svd(g, full_matrices=False)
            P = u[:, :rank] if m_dim < n_dim else vh[:rank].T  # left for wide, right for tall
        r = P.T @ g if m_dim < n_dim else g @ P
        M = (1 - b1) * r if M is None else b1 * M + (1 - b1) * r
        V = (1 - b2) * r * r if V is None else b2 * V + (1 - b2) * r * r
        n = (M / (V.sqrt() + eps)) * ((1 - b2 ** t) ** 0.5 / (1 - b1 ** t))
        g_full = scale * (P @ n if m_dim < n_dim else n @ P.T)
        w = w - lr * g_full
        w = w - lr * wd * w
    return w


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_galore_follows_the_papers_update_rule(shape):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(5)]
    p = torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW([p], lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, rank=2, update_proj_gap=2, scale=0.25)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = paper_galore_adam(w0, grads, lr=0.1, b1=0.9, b2=0.95, eps=1e-6, wd=0.1, rank=2, gap=2, scale=0.25)
    assert float((p.detach() - ref).abs().max()) < 1e-12
    assert float((p.detach() - w0).abs().max()) > 1e-2
    assert opt.state[p]["exp_avg"].shape == ((2, shape[1]) if shape[0] < shape[1] else (shape[0], 2))


def test_galore_optimizer_state_is_a_fraction_of_adamws(tiny_model_files):
    span = tiny_model_files.load_span(0, 2)
    host = AdapterHost()
    x = torch.randn(1, 6, span.hidden_size, generator=torch.Generator().manual_seed(3))
    sizes = {}
    for method in ("full", "galore"):
        job = make_job(method, JobSpec(method=method, rank=4, grad_clip=0.0), span, host)
        backward_step(job, span, host, x, torch.ones_like(x))
        sizes[method] = job.adapter.optimizer_state_bytes(job.optimizer)
    params = sum(p.numel() for p in span.parameters())
    assert sizes["full"] == 2 * 4 * params  # AdamW: two fp32 moments per parameter
    print(f"optimizer state: AdamW {sizes['full']} B, GaLore rank 4 {sizes['galore']} B")
    assert sizes["galore"] < 0.25 * sizes["full"]


def peft_prefix_model(reference_model, spec, init_embeddings):
    """PEFT's prefix tuning on the whole model, started from the spans' initial prefix."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(reference_model),
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.num_virtual_tokens))
    weight = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(init_embeddings)
    return model, weight


def test_prefix_tuning_matches_peft_trains_exports_and_caches(tmp_path, tiny_model_files, tiny_reference_model):
    from peft import PeftModel

    from pollinate.client.peft_export import export_job
    from pollinate.node.adapters.prefix import peft_prompt_embeddings

    micro = 2
    spec = JobSpec(method="prefix-tuning", num_virtual_tokens=3, lr=1e-2, micro_batches=micro, grad_clip=0.0, seed=3)
    data = batches(3 * micro)
    jobs, init, swarm_logits = train_spans(tiny_model_files, spec, data, micro)
    init_emb = peft_prompt_embeddings(init, 4)["prompt_embeddings"]
    assert init_emb.shape == (3, 4 * 2 * 2 * 16)  # P x blocks x (K, V) x KV heads x head dim
    model, weight = peft_prefix_model(tiny_reference_model, spec, init_emb)
    opt = torch.optim.AdamW([weight], lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    for i in range(0, len(data), micro):
        for ids in data[i:i + micro]:
            (causal_lm_loss(model(ids).logits, ids) / micro).backward()
        opt.step()
        opt.zero_grad()
    got = peft_prompt_embeddings({k: v for job in jobs for k, v in job.adapter.peft_state().items()}, 4)
    moved = float((got["prompt_embeddings"] - init_emb).abs().max())
    diff = float((got["prompt_embeddings"] - weight.detach()).abs().max())
    print(f"prefix-tuning: moved {moved:.3e}, spans vs PEFT max |diff| {diff:.3e}")
    assert moved > 1e-3 and diff <= 1e-5, (moved, diff)

    # the export, as `pollinate export` writes it, loads in PEFT and gives the spans' logits
    state = {k: v for job in jobs for k, v in job.adapter.peft_state().items()}
    export_job(tmp_path / "prefix", spec, state, tiny_model_files, base_model="tiny")
    exported = PeftModel.from_pretrained(copy.deepcopy(tiny_reference_model), str(tmp_path / "prefix")).eval()
    ids = batches(1, seed=7)[0]
    with torch.no_grad():
        gap = float((exported(ids).logits - swarm_logits(ids)).abs().max())
        base_gap = float((tiny_reference_model(ids).logits - swarm_logits(ids)).abs().max())
    print(f"prefix-tuning: exported PEFT vs spans logits {gap:.3e} (base {base_gap:.3e})")
    assert gap <= 1e-5 and base_gap > 1e-3

    # an Inference session (KV cache, chunk then token by token) = the whole sequence at once
    span = tiny_model_files.load_span(0, 4)
    host = AdapterHost()
    job = make_job("p", spec, span, host)
    x = torch.randn(2, 7, span.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), host.use(job.adapter):
        whole = span(x)
        cache = span.new_cache(batch_size=2, max_length=7)
        steps = [span(x[:, :4], cache=cache)] + [span(x[:, t:t + 1], cache=cache) for t in range(4, 7)]
        base_whole = span(x)
        base_cache = span.new_cache(batch_size=2, max_length=7)
        base_steps = [span(x[:, :4], cache=base_cache)] + [span(x[:, t:t + 1], cache=base_cache) for t in range(4, 7)]
    gap = float((torch.cat(steps, dim=1) - whole).abs().max())
    base_gap = float((torch.cat(base_steps, dim=1) - base_whole).abs().max())
    print(f"prefix-tuning: cached vs whole {gap:.3e} (the base span's own {base_gap:.3e}; outputs up to "
          f"{float(whole.abs().max()):.1f})")
    # fp32 rounding of attention over other shapes, relative to outputs of ~10: a wrong
    # position, mask or cache would be off by O(1)
    assert gap <= 1e-5 * float(whole.abs().max()), gap
    assert cache.length == 7  # the prefix is the job's: it takes no slot of the session's cache


def test_llama_adapter_matches_peft_and_exports(tmp_path, tiny_model_files, tiny_reference_model):
    """Top 2 of 4 blocks: span [0:1] holds nothing of the job (it trains nothing, runs as the
    base model for it, still counts its steps); the others equal PEFT's adaption prompt."""
    from peft import PeftModel

    from pollinate.client.peft_export import export_job

    micro = 2
    spec = JobSpec(method="llama-adapter", num_virtual_tokens=3, rank=2, lr=1e-2, micro_batches=micro,
                   grad_clip=0.0, seed=3)
    data = batches(3 * micro)
    jobs, init, swarm_logits = train_spans(tiny_model_files, spec, data, micro)
    assert jobs[0].optimizer is None and not jobs[0].adapter.peft_state() and jobs[0].inner_steps == 3
    ref_init, ref, _ = local_run(tiny_model_files, tiny_reference_model, spec, data, micro)
    assert set(init) == set(ref_init) and all(torch.equal(init[k], ref_init[k]) for k in init)
    got = {k: v for job in jobs for k, v in job.adapter.peft_state().items()}
    gates = [float(v.abs().max()) for k, v in got.items() if k.endswith("adaption_gate")]
    diff = max(float((got[k] - ref[k]).abs().max()) for k in got)
    print(f"llama-adapter: gates {gates} (zero at init), spans vs PEFT max |diff| {diff:.3e}")
    assert min(gates) > 1e-3 and diff <= 1e-5, (gates, diff)

    export_job(tmp_path / "la", spec, got, tiny_model_files, base_model="tiny")
    exported = PeftModel.from_pretrained(copy.deepcopy(tiny_reference_model), str(tmp_path / "la")).eval()
    ids = batches(1, seed=7)[0]
    with torch.no_grad():
        gap = float((exported(ids).logits - swarm_logits(ids)).abs().max())
        base_gap = float((tiny_reference_model(ids).logits - swarm_logits(ids)).abs().max())
    print(f"llama-adapter: exported PEFT vs spans logits {gap:.3e} (base {base_gap:.3e})")
    assert gap <= 1e-5 and base_gap > 1e-3


def test_reft_reuses_its_rotation_only_until_it_changes(tiny_model_files):
    """Without autograd the rotation is computed once per change of what trains: the
    cached value is the parametrization's, and an optimizer step or a round's in-place
    assignment is seen by the next call."""
    from pollinate.node.diloco import assign_flat, flatten_params

    span = tiny_model_files.load_span(0, 1)
    host = AdapterHost()
    job = make_job("j", JobSpec(method="reft", rank=2, lr=5e-2, grad_clip=0.0), span, host)
    iv = job.adapter.interventions["0"]
    x = torch.randn(1, 5, span.hidden_size, generator=torch.Generator().manual_seed(4))

    def fresh():
        with torch.enable_grad():
            return iv.rotate_layer.weight.detach().clone()

    with torch.inference_mode():
        first = iv.rotation()
        assert iv.rotation() is first and torch.equal(first, fresh())
    backward_step(job, span, host, x, torch.randn_like(x))
    with torch.no_grad():
        assert torch.equal(iv.rotation(), fresh()) and not torch.equal(iv.rotation(), first)
        params = list(job.adapter.parameters())
        assign_flat(params, flatten_params(params) * 0.5)
        assert torch.equal(iv.rotation(), fresh())
