"""Fine-tuning through a local swarm of the embedded SmolLM2-135M-Instruct, against the same
training in one process.

Task: two-digit addition answered with just the number ("What is 47 + 38? ..." -> "85"),
rendered with the model's chat template, loss on the completion only. Starts 3 nodes x 10
blocks on loopback (fp32 on the wire), measures greedy exact-match accuracy on held-out
sums through the swarm (base model), trains a LoRA job through the swarm, measures the
accuracy again through the swarm with the job's adapter (Inference sessions), then runs
the same steps (same initial adapter, same batches, same AdamW) locally with PEFT on the
whole model in this process. Prints one JSON object: accuracy_before, accuracy_after,
swarm_tokens_per_s, local_tokens_per_s, ratio (swarm/local), and the local run's accuracy.

Wire codecs (issue 12): `--wires none,int8row,int4row/int4row-sr` trains one job per wire
in the same swarm, same seed, same batches and same initial adapter (a wire is the codec
of the hidden states, then after "/" the codec of the gradients; without "/" both), and
prints one JSON object per wire with its final loss, held-out accuracy and the encoded
bytes per trained token per hop that crossed the trainer's links (the sizes of the tensors
it sent and received, from the trainer's own counters; protocol overhead not included).
The local reference runs only for a single fp32 wire.

    python benchmarks/bench_finetune.py [--quick] [--steps 30] [--batch-size 8] [--lr 2e-3]
    python benchmarks/bench_finetune.py --wires none,int8row,int4row/int4row-sr --seed 1
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from local_swarm import local_swarm  # benchmarks/ is on sys.path when run as a script

SPANS = [(0, 10), (10, 20), (20, 30)]
JOB = "sums"


def addition_records(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out two-digit sums as prompt/completion records."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    recs = [{"prompt": f"What is {a} + {b}? Answer with just the number.", "completion": str(a + b)}
            for a, b in pairs[:n_train + n_eval]]
    return recs[:n_train], recs[n_train:]


def prompt_ids(tok, rec: dict):
    text = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False).input_ids


def accuracy(generate, tok, records: list[dict], max_new_tokens: int = 6) -> tuple[float, list[str]]:
    """Greedy exact match of the stripped answer; also the first few answers, for the report."""
    hits, answers = 0, []
    for rec in records:
        ids = prompt_ids(tok, rec)
        out = generate(ids, max_new_tokens)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        hits += text == rec["completion"]
        answers.append(text)
    return hits / len(records), answers[:5]


def main() -> int:
    p = argparse.ArgumentParser(description="LoRA fine-tuning through a local SmolLM2 swarm vs in one process")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 10 held-out examples")
    p.add_argument("--train-examples", type=int, default=300)
    p.add_argument("--eval-examples", type=int, default=50)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per node and for this process")
    p.add_argument("--skip-local", action="store_true", help="no local reference run (no tokens/s ratio)")
    p.add_argument("--workdir", type=Path, help="keep node logs here (default: a temp dir)")
    p.add_argument("--wires", default="none", help="comma-separated wires to train, each ACT[/GRAD] codecs "
                                                  "(e.g. none,int8row,int4row/int4row-sr); one job and JSON line each")
    p.add_argument("--no-keep-inputs", action="store_true", help="Backward re-sends each hop's input (before issue 12)")
    p.add_argument("--skip-before", action="store_true", help="do not measure the base model's accuracy")
    args = p.parse_args()
    wires = [tuple((w.split("/") + [""])[:2]) for w in args.wires.split(",")]
    steps, n_eval = (4, 10) if args.quick else (args.steps, args.eval_examples)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    extra = ["--torch-threads", str(args.torch_threads), "--throughput", "100"]
    train_recs, eval_recs = addition_records(args.train_examples, n_eval, args.seed)
    t_start = time.perf_counter()

    with local_swarm(workdir, model="smollm2", spans=SPANS, extra=extra) as swarm:
        from pollinate.client.remote_model import RemoteModelForCausalLM  # DHT first, then gRPC

        remote = RemoteModelForCausalLM.from_pretrained("smollm2", initial_peers=[swarm.maddr], wire_codec="none")
        import torch

        from pollinate.client.trainer import Trainer, TrainConfig
        from pollinate.client.training_data import batches, tokenize
        from pollinate.protocol.shared import JobSpec

        torch.set_num_threads(args.torch_threads)
        files = remote.model_files
        tok = files.tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        train = tokenize(list(enumerate(train_recs, 1)), tok, max_length=2048, path=Path("<addition>"))
        held = tokenize(list(enumerate(eval_recs, 1)), tok, max_length=2048, path=Path("<addition>"))
        # grad_clip 0: clipping is per span on the nodes, global locally; off, both runs are the same math.
        spec = JobSpec(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(",")), lr=args.lr,
                       grad_clip=0.0, seed=args.seed)

        def remote_generate(job: str):
            def gen(ids, n):
                with remote.inference_session(max_length=ids.shape[1] + n, job=job):
                    return remote.generate(ids, max_new_tokens=n, do_sample=False)
            return gen

        acc_before, answers_before, eval_s = None, None, None
        if not args.skip_before:
            t0 = time.perf_counter()
            acc_before, answers_before = accuracy(remote_generate(""), tok, eval_recs)
            eval_s = time.perf_counter() - t0

        for wire, grad_wire in wires:
            job = JOB if wires == [("none", "")] else f"{JOB}-{wire}-{grad_wire or wire}"
            config = TrainConfig(job=job, spec=spec, steps=steps, batch_size=args.batch_size, wire_codec=wire,
                                 grad_codec=grad_wire, keep_inputs=not args.no_keep_inputs, seed=args.seed)
            trainer = Trainer(swarm=remote.swarm, worker=remote.worker, client_part=remote.client_part, pad_id=pad,
                              config=config, timeout_s=300.0)
            data = batches(train, config.batch_size, config.seed)
            used: list = []

            def counted():
                for b in data:
                    used.append(b)
                    yield b

            t0 = time.perf_counter()
            history = trainer.train(counted(), progress=False)
            swarm_s = time.perf_counter() - t0
            tokens = sum(len(e.input_ids) for b in used for e in b)
            wire_bytes = history[-1]["wire_bytes_sent"] + history[-1]["wire_bytes_received"]
            acc_after, answers_after = accuracy(remote_generate(job), tok, eval_recs)
            # held-out loss (completion tokens) with the job's adapter: through this wire, and
            # through fp32 (the adapter's quality without the wire's rounding at evaluation)
            eval_loss = trainer.evaluate(held)
            exact = Trainer(swarm=remote.swarm, worker=remote.worker, client_part=remote.client_part, pad_id=pad,
                            config=replace(config, wire_codec="none", grad_codec=""), timeout_s=300.0)
            eval_loss_fp32 = exact.evaluate(held)
            swarm_state = trainer.adapter_state()
            result = {
                "bench": "finetune", "model": "smollm2-135m-instruct", "task": "two-digit addition, answer only",
                "train_examples": len(train_recs), "eval_examples": len(eval_recs), "steps": steps,
                "batch_size": args.batch_size, "lr": args.lr, "rank": args.rank, "alpha": args.alpha,
                "targets": args.targets, "seed": args.seed, "codec": wire, "grad_codec": config.gradient_codec,
                "keep_inputs": config.keep_inputs, "nodes": len(SPANS), "torch_threads": args.torch_threads,
                "accuracy_before": None if acc_before is None else round(acc_before, 3),
                "accuracy_after": round(acc_after, 3),
                "answers_before": answers_before, "answers_after": answers_after,
                "loss_first": round(history[0]["loss"], 4), "loss_last": round(history[-1]["loss"], 4),
                # the mean over the last 5 steps: one step's loss is one batch's
                "loss_last5": round(sum(r["loss"] for r in history[-5:]) / len(history[-5:]), 4),
                "eval_loss": round(eval_loss, 4), "eval_loss_fp32_wire": round(eval_loss_fp32, 4),
                "train_tokens": tokens, "wire_bytes": wire_bytes,
                "bytes_per_token_per_hop": round(wire_bytes / tokens / len(SPANS), 1),
                "input_resends": history[-1]["input_resends"], "swarm_train_s": round(swarm_s, 1),
                "swarm_tokens_per_s": round(tokens / swarm_s, 1),
                "eval_s_per_pass": None if eval_s is None else round(eval_s, 1),
            }
            if not args.skip_local and wires == [("none", "")]:
                result.update(local_reference(files, spec, used, pad, swarm_state, tok, eval_recs, tokens))
                result["ratio"] = round(result["swarm_tokens_per_s"] / result["local_tokens_per_s"], 3)
            result["total_s"] = round(time.perf_counter() - t_start, 1)
            print(json.dumps(result), flush=True)
        remote.shutdown()
    return 0


def local_reference(files, spec, used, pad, swarm_state, tok, eval_recs, tokens) -> dict:
    """The same steps in this process: PEFT LoRA on the whole model, the job's initial adapter
    (node code, keyed by seed and module name), the same batches and torch AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model

    from pollinate.client.training_data import causal_lm_loss, collate
    from pollinate.node.adapters import AdapterHost
    from pollinate.node.training import make_job

    init = make_job("ref", spec, files.load_span(0, files.num_blocks), AdapterHost()).adapter.peft_state()
    model = get_peft_model(files.load_reference_model(), LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0))
    named = {k.replace(".default", ""): v for k, v in model.named_parameters() if "lora_" in k}
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(init[k])
    opt = torch.optim.AdamW(list(named.values()), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    model.train()
    t0 = time.perf_counter()
    for batch in used:
        ids, labels = collate(batch, pad)
        loss = causal_lm_loss(model(ids).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
    local_s = time.perf_counter() - t0
    model.eval()
    diff = max(float((swarm_state[k] - named[k].detach()).abs().max()) for k in named)

    def gen(ids, n):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, do_sample=False)

    acc, _ = accuracy(gen, tok, eval_recs)
    return {"local_train_s": round(local_s, 1), "local_tokens_per_s": round(tokens / local_s, 1),
            "local_accuracy_after": round(acc, 3), "adapter_max_abs_diff_swarm_vs_local": float(f"{diff:.3e}")}


if __name__ == "__main__":
    raise SystemExit(main())
