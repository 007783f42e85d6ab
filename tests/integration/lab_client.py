"""A client for the network-lab swarm test: given only the coordinator's address, generate
greedily through the swarm, then train a LoRA job on seeded token batches (DiLoCo rounds
every --round-steps steps), and print one JSON line: {"tokens": [...], "losses": [...]}.

    python lab_client.py --model DIR --cache-dir C --coordinator 10.77.0.1:7070 --token T \
        --prompt-ids 1,5,9 --max-new-tokens 8 --job lab --steps 4 --round-steps 2
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--prompt-ids", required=True)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--job", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--round-steps", type=int, default=2)
    args = p.parse_args()

    # The DHT (a forked process) starts inside from_pretrained, before any gRPC object.
    from pollinate.client.remote_model import RemoteModelForCausalLM

    model = RemoteModelForCausalLM.from_pretrained(args.model, coordinator=args.coordinator, token=args.token,
                                                   cache_dir=args.cache_dir, wire_codec="none")
    import torch

    from pollinate.client.trainer import TrainConfig, Trainer
    from pollinate.client.training_data import Example
    from pollinate.protocol.shared import JobSpec

    try:
        prompt = torch.tensor([[int(x) for x in args.prompt_ids.split(",")]])
        out = model.generate(prompt, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                             do_sample=False)
        tokens = out[0, prompt.shape[1]:].tolist()
        if args.steps == 0:  # generation only
            print(json.dumps({"tokens": tokens, "losses": []}), flush=True)
            return 0

        spec = JobSpec(rank=4, alpha=8.0, lr=1e-2, round_steps=args.round_steps, seed=3)
        config = TrainConfig(job=args.job, spec=spec, steps=args.steps, batch_size=2, wire_codec="none")
        trainer = Trainer(swarm=model.swarm, worker=model.worker, client_part=model.model_files.load_client_part(),
                          pad_id=0, config=config)
        g = torch.Generator().manual_seed(1)
        batches = iter([[Example(input_ids=row.tolist(), labels=row.tolist())
                         for row in torch.randint(3, 256, (2, 12), generator=g)] for _ in range(args.steps)])
        history = trainer.train(batches, progress=False)
        print(json.dumps({"tokens": tokens, "losses": [h["loss"] for h in history]}), flush=True)
        return 0
    finally:
        model.shutdown()


if __name__ == "__main__":
    sys.exit(main())
