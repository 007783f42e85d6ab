"""Every fine-tuning method Pollinate trains, side by side, through one local SmolLM2 swarm.

Task: bench_finetune's (two-digit addition answered with just the number, chat template,
loss on the completion only), the same train / held-out split, batches and seed for every
method. Three nodes x 10 blocks on loopback, fp32 on the wire. For each of the ten methods,
one job trained through the swarm, then:

- `accuracy_before` / `accuracy_after`: greedy exact match on the held-out sums through the
  swarm (the base model once; then with the job: Inference sessions with its adapter, or
  the soft prompt in front for prompt tuning);
- `final_loss`: the mean training loss of the last 5 steps; `eval_loss`: held-out loss;
- `step_s`: swarm training seconds per optimizer step (under this machine's load);
- `trainable_params`, `node_state_bytes`: the job's trainable tensors and the optimizer
  state (AdamW's moments, GaLore's projected moments and projectors) over the whole
  model, measured on the node code in this process after one step (prompt tuning: the
  trainer holds it, the nodes 0; `trainer_state_bytes`);
- `round_bytes`: one DiLoCo round of two replicas of a span holding the whole model, bytes
  one member sends and receives (node/diloco.py exchange_in_process: the calls the network
  layer makes, message framing not included), the job's flat vector through its default
  round settings (`job_diloco_config(spec)`), pseudo-gradients N(0, 1e-4) per member
  (the byte count depends on the vector's size and the codec, little on the values);
- `export_format`, `export_max_diff`: `pollinate export`'s code path (gather from the nodes,
  write), loaded back by the standard library (PEFT, transformers, or client/method_export.py's
  loader where no installable library loads the format) in this process; max |logits -
  swarm's logits with the job| on a held-out prompt.

Per-method settings are fixed before any run from the papers / PEFT examples (see
SETTINGS), not tuned here; one seed. A method that fails is reported as
{"method": ..., "available": false, "reason": ...}, never with made-up numbers.

    python benchmarks/bench_methods.py [--quick] [--steps 30] [--methods lora,ia3,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench_finetune import JOB, SPANS, accuracy, addition_records
from local_swarm import local_swarm  # benchmarks/ is on sys.path when run as a script

METHODS = ["lora", "ia3", "ln-tuning", "full", "prompt-tuning", "prefix-tuning", "llama-adapter", "bottleneck",
           "galore", "reft"]
# Per-method settings, fixed from the papers / PEFT's examples (not tuned on this task):
SETTINGS = {
    # bench_finetune's LoRA: r 8, alpha 16 on the attention projections, lr 2e-3
    "lora": dict(lr=2e-3, rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "ia3": dict(lr=3e-3),  # IA3 paper (T-Few): lr 3e-3; PEFT's Llama targets
    "ln-tuning": dict(lr=2e-3),  # as LoRA; PEFT's Llama targets
    "full": dict(lr=1e-4),  # a common full fine-tuning lr for a model this size
    "prompt-tuning": dict(lr=3e-2, num_virtual_tokens=20),  # PEFT's prompt-tuning example
    "prefix-tuning": dict(lr=1e-2, num_virtual_tokens=20),  # PEFT's prefix-tuning example
    # LLaMA-Adapter paper: prompt length 10, lr 9e-3, all but the bottom 2 blocks (30 of 32)
    "llama-adapter": dict(lr=9e-3, num_virtual_tokens=10, rank=28),
    "bottleneck": dict(lr=1e-3, rank=16),  # Houlsby placement, width 16, lr 1e-3 (Houlsby et al.'s range)
    "reft": dict(lr=2e-3, rank=4),  # LoReFT rank 4 (the paper's commonsense setting)
    "galore": dict(lr=1e-3, rank=32),  # GaLore: rank 32, scale 0.25, T 200 (> steps: one projector)
}
QUICK_DIMS = {"rank": 4, "num_virtual_tokens": 4}  # --quick: smaller adapters


def main() -> int:
    p = argparse.ArgumentParser(description="all fine-tuning methods through a local SmolLM2 swarm")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, 4 held-out sums, small adapters")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--train-examples", type=int, default=300)
    p.add_argument("--eval-examples", type=int, default=50)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per node and for this process")
    p.add_argument("--workdir", type=Path, help="node logs and exports here (default: a temp dir)")
    args = p.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {METHODS}")
    steps, n_eval, batch = (2, 4, 4) if args.quick else (args.steps, args.eval_examples, args.batch_size)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-methods-"))
    extra = ["--torch-threads", str(args.torch_threads), "--throughput", "100"]
    train_recs, eval_recs = addition_records(args.train_examples, n_eval, args.seed)

    with local_swarm(workdir, model="smollm2", spans=SPANS, extra=extra) as swarm:
        from pollinate.client.remote_model import RemoteModelForCausalLM  # DHT first, then gRPC

        remote = RemoteModelForCausalLM.from_pretrained("smollm2", initial_peers=[swarm.maddr], wire_codec="none")
        import torch

        from pollinate.client.training_data import tokenize

        torch.set_num_threads(args.torch_threads)
        tok = remote.model_files.tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        train = tokenize(list(enumerate(train_recs, 1)), tok, max_length=2048, path=Path("<addition>"))
        held = tokenize(list(enumerate(eval_recs, 1)), tok, max_length=2048, path=Path("<addition>"))
        acc_before, _ = accuracy(remote_generate(remote, ""), tok, eval_recs)
        for method in methods:
            t0 = time.perf_counter()
            try:
                result = run_method(method, args, remote, tok, pad, train, held, eval_recs, steps, batch, workdir)
            except Exception as exc:  # reported as it is, the next method still runs
                traceback.print_exc(file=sys.stderr)
                result = {"method": method, "available": False, "reason": f"{type(exc).__name__}: {exc}"}
            result = {"bench": "methods", "model": "smollm2-135m-instruct", "quick": args.quick, **result}
            if result.get("available", True):
                result["accuracy_before"] = round(acc_before, 3)
            result["total_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(result), flush=True)
        remote.shutdown()
    return 0


def remote_generate(remote, job: str, soft_prompt=None):
    def gen(ids, n):
        remote.soft_prompt = soft_prompt
        try:
            with remote.inference_session(max_length=ids.shape[1] + n, job=job):
                return remote.generate(ids, max_new_tokens=n, do_sample=False)
        finally:
            remote.soft_prompt = None
    return gen


def method_spec(method: str, args):
    from pollinate.protocol.shared import JobSpec

    settings = dict(SETTINGS[method])
    if args.quick:
        settings.update({k: v for k, v in QUICK_DIMS.items() if k in settings})
        if method == "llama-adapter":
            settings["rank"] = 4  # top blocks
    return JobSpec(method=method, seed=args.seed, **settings)


def run_method(method, args, remote, tok, pad, train, held, eval_recs, steps, batch, workdir) -> dict:
    import torch

    from pollinate.client.peft_export import export_job, gather_job
    from pollinate.client.prompt_tuning import PromptTuningTrainer
    from pollinate.client.trainer import Trainer, TrainConfig
    from pollinate.client.training_data import batches

    files = remote.model_files
    spec = method_spec(method, args)
    job = f"{JOB}-{method}"
    config = TrainConfig(job=job, spec=spec, steps=steps, batch_size=batch, wire_codec="none", seed=args.seed)
    trainer = (PromptTuningTrainer if method == "prompt-tuning" else Trainer)(
        swarm=remote.swarm, worker=remote.worker, client_part=remote.client_part, pad_id=pad, config=config,
        timeout_s=600.0)
    t0 = time.perf_counter()
    history = trainer.train(batches(train, batch, args.seed), progress=False)
    swarm_s = time.perf_counter() - t0
    eval_loss = trainer.evaluate(held)

    out = workdir / "export" / method
    if method == "prompt-tuning":
        state = trainer.adapter_state()
        soft_prompt = state["prompt_embeddings"]
        acc_after, answers = accuracy(remote_generate(remote, "", soft_prompt), tok, eval_recs)
    else:
        spec_back, state = remote.worker.run(gather_job(remote.swarm, job), 600.0)
        assert spec_back == spec, (spec_back, spec)
        acc_after, answers = accuracy(remote_generate(remote, job), tok, eval_recs)
    export_job(out, spec, state, files, base_model="smollm2")
    probe = torch.tensor([held[0].input_ids])
    export_format, export_diff = reload_gap(method, out, files, probe, trainer.forward_logits(probe), spec)
    params, node_bytes, trainer_bytes, round_bytes, numel = state_sizes(spec, files)
    return {
        "method": method, "available": True, "steps": steps, "batch_size": batch, "lr": spec.lr,
        "settings": {k: getattr(spec, k) for k in SETTINGS[method] if k != "lr"},
        "trainable_params": params, "accuracy_after": round(acc_after, 3), "answers_after": answers,
        "final_loss": round(sum(h["loss"] for h in history[-5:]) / len(history[-5:]), 4),
        "loss_first": round(history[0]["loss"], 4), "eval_loss": round(eval_loss, 4),
        "node_state_bytes": node_bytes, "trainer_state_bytes": trainer_bytes,
        "round_bytes": round_bytes, "round_numel": numel,
        **({"round_bytes_note": "trainer-side method: nodes hold nothing, no DiLoCo round"}
           if method == "prompt-tuning" else {}),
        "step_s": round(swarm_s / steps, 2), "export_format": export_format,
        "export_max_diff": float(f"{export_diff:.3e}"),
    }


def reload_gap(method, out, files, probe, swarm_logits, spec) -> tuple[str, float]:
    """Load the export with the library its format belongs to; max |logits - swarm's|."""
    import torch
    from transformers import AutoModelForCausalLM

    from pollinate.client.method_export import FORMATS, load_method_adapter

    trim = 0
    if method in ("full", "galore"):
        model, fmt = AutoModelForCausalLM.from_pretrained(out), "transformers full checkpoint"
    elif method in FORMATS:
        model = files.load_reference_model()
        load_method_adapter(model, out)
        fmt = f"{FORMATS[method]} (pollinate loader)"
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(files.load_reference_model(), str(out))
        fmt = f"PEFT {json.loads((out / 'adapter_config.json').read_text())['peft_type']}"
        trim = spec.num_virtual_tokens if method == "prompt-tuning" else 0
    with torch.no_grad():
        local = model.eval()(probe).logits[:, trim:]
    return fmt, float((local - swarm_logits).abs().max())


def state_sizes(spec, files) -> tuple[int, int, int | None, int | None, int]:
    """(trainable params, node bytes, trainer bytes, round bytes of one member, flat numel),
    on the node code in this process: the job on one span holding every block, one step."""
    import torch

    from pollinate.node.adapters import AdapterHost
    from pollinate.node.diloco import DiLoCoMember, exchange_in_process, flatten_params, job_diloco_config
    from pollinate.node.training import backward_step, make_job

    if spec.method == "prompt-tuning":  # the trainer's: the prompt and its AdamW moments
        n = spec.num_virtual_tokens * files.config.hidden_size
        return n, 0, 3 * 4 * n, None, n
    span = files.load_span(0, files.num_blocks)
    host = AdapterHost()
    job = make_job("size", spec, span, host)
    x = torch.randn(1, 8, span.hidden_size, generator=torch.Generator().manual_seed(0))
    backward_step(job, span, host, x, torch.randn_like(x), input_grad=False)
    params = list(job.adapter.parameters())
    numel = sum(p.numel() for p in params)
    node_bytes = sum(p.numel() * p.element_size() for p in params) + job.adapter.optimizer_state_bytes(job.optimizer)
    flat = flatten_params(params)
    config = job_diloco_config(spec)
    members = [DiLoCoMember(flat.clone(), config) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    local = [flat + 1e-4 * torch.randn(flat.shape, generator=gen) for _ in members]
    report = exchange_in_process(members, local, [1000, 1000], round_index=config.warmup_rounds + 1)
    del job, span, members
    return numel, node_bytes, None, report.bytes_per_member[0], numel


if __name__ == "__main__":
    raise SystemExit(main())
