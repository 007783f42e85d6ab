"""A trainer process for the fine-tuning tests: train a job on seeded token batches through
the swarm, export it, and save the swarm's logits (with the job) for a probe.

    python finetune_client.py --model DIR --cache-dir C --initial-peers MADDR --out DIR \
        --job J --steps 3 --rank 4 --alpha 8 --lr 0.01 --micro-batches 1 --seed 3 \
        [--methods lora | ia3,ln-tuning,full,prompt-tuning,bottleneck,reft,galore] [--num-virtual-tokens 4]

With several methods, one job per method (J-METHOD) is trained in turn and exported to
OUT/METHOD with the job's settings read back from the nodes (client/peft_export.py); the
LoRA run (one method, "lora") also generates through the swarm and exports to OUT.
"""

from __future__ import annotations

import argparse
import json
import sys


def token_batches(n: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (2, 12), generator=g) for _ in range(n)]


def generate(args, dht, job: str, probe, path: str, soft_prompt: str | None = None) -> dict:
    """Greedy generation through the swarm's Inference sessions with the job's adapter (or
    the soft prompt exported to directory `soft_prompt`), saved to `path`; also the error a
    session with an unknown job gets."""
    from safetensors.torch import save_file

    from pollinate.client.remote_model import RemoteModelForCausalLM

    remote = RemoteModelForCausalLM.from_pretrained(args.model, dht=dht, cache_dir=args.cache_dir, job=job,
                                                    wire_codec="none")
    if soft_prompt is not None:
        remote.load_soft_prompt(soft_prompt)
    prompt = probe[:1, :6]
    generated = remote.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    base = {}
    try:
        with remote.inference_session(max_length=8, job="no-such-job"):
            remote.forward(prompt)
    except Exception as e:  # the node answers NOT_FOUND for a job it does not have
        base["unknown_job_error"] = f"{type(e).__name__}: {e}"
    remote.worker.run(remote.swarm.close(), 5.0)
    remote.worker.stop()
    save_file({"prompt": prompt, "generated": generated}, path)
    return base


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("--model", "--cache-dir", "--out", "--job"):
        p.add_argument(name, required=True)
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--methods", default="lora")
    p.add_argument("--targets", default="", help="comma-separated LoRA targets [the method's default]")
    p.add_argument("--num-virtual-tokens", type=int, default=4)
    p.add_argument("--adapter-layers", type=int, default=2, help="llama-adapter: top blocks L (its JobSpec.rank)")
    args = p.parse_args()

    from pollinate.node.announce import start_dht

    dht = start_dht(args.initial_peers, client_mode=True)  # before any gRPC object
    from safetensors.torch import save_file

    from pollinate.client.config import ClientConfig
    from pollinate.client.peft_export import export_job, gather_job
    from pollinate.client.prompt_tuning import PromptTuningTrainer
    from pollinate.client.swarm import Swarm
    from pollinate.client.trainer import Trainer, TrainConfig
    from pollinate.client.training_data import Example, causal_lm_loss
    from pollinate.client.worker import LoopThread
    from pollinate.node.model_files import open_model
    from pollinate.protocol.shared import JobSpec

    files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
    worker = LoopThread()
    swarm = Swarm(dht=dht, model_id=args.model, num_blocks=files.num_blocks,
                  config=ClientConfig(wire_codec="none", ban_base_s=60.0))
    methods = args.methods.split(",")
    histories, first_loss = {}, {}
    for method in methods:
        job = args.job if methods == ["lora"] else f"{args.job}-{method}"
        out = args.out if methods == ["lora"] else f"{args.out}/{method}"
        spec = JobSpec(method=method, rank=args.adapter_layers if method == "llama-adapter" else args.rank,
                       alpha=args.alpha, lr=args.lr, micro_batches=args.micro_batches, grad_clip=0.0, seed=args.seed,
                       targets=tuple(t for t in args.targets.split(",") if t),
                       num_virtual_tokens=(args.num_virtual_tokens
                                           if method in ("prompt-tuning", "prefix-tuning", "llama-adapter") else 0))
        config = TrainConfig(job=job, spec=spec, steps=args.steps, batch_size=2, wire_codec="none")
        trainer = (PromptTuningTrainer if method == "prompt-tuning" else Trainer)(
            swarm=swarm, worker=worker, client_part=files.load_client_part(), pad_id=0, config=config)
        data = token_batches(args.steps * args.micro_batches)
        batch_iter = iter([[Example(input_ids=row.tolist(), labels=row.tolist()) for row in ids] for ids in data])
        histories[method] = trainer.train(batch_iter, progress=False)
        if method == "prompt-tuning":
            got_spec, state = spec, trainer.adapter_state()
        else:  # the job's settings as the nodes report them, not ours
            got_spec, state = worker.run(gather_job(swarm, job), 120.0)
            assert got_spec == spec, (got_spec, spec)
        export_job(out, got_spec, state, files, base_model=args.model)
        probe = token_batches(1, seed=99)[0]
        save_file({"probe": probe, "logits": trainer.forward_logits(probe),
                   "base_logits": trainer.forward_logits(probe, job="")}, f"{out}/swarm_logits.safetensors")
        first = data[0]  # the loss of the first training batch, base model and trained job (loss falls)
        first_loss[method] = {
            "base": float(causal_lm_loss(trainer.forward_logits(first, job=""), first)),
            "trained": float(causal_lm_loss(trainer.forward_logits(first), first))}
        if method in ("full", "reft", "prefix-tuning", "llama-adapter"):  # weights swapped in; a block output hooked; a prefix
            # before the session's cache
            generate(args, dht, f"{job}", probe, f"{out}/swarm_generate.safetensors")
        if method == "prompt-tuning":  # the base model in the swarm, the exported soft prompt here
            generate(args, dht, "", probe, f"{out}/swarm_generate.safetensors", soft_prompt=out)
    if methods != ["lora"]:
        print(json.dumps({"history": histories, "first_batch_loss": first_loss}), flush=True)
        worker.run(swarm.close(), 5.0)
        worker.stop()
        dht.shutdown()
        return 0
    history = histories["lora"]
    base = generate(args, dht, args.job, probe, f"{args.out}/swarm_generate.safetensors")
    print(json.dumps({"history": history, **base}), flush=True)
    worker.run(swarm.close(), 5.0)
    worker.stop()
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
