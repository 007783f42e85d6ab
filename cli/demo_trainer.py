"""The demo's trainer for one replica: `pollinate train` whose batches avoid the other replica.

`pollinate demo` hosts one span twice so that the two replicas run DiLoCo rounds. A trainer
sends every micro-batch along the cheapest chain of spans (client/routing.py), so two plain
`pollinate train` processes would both feed the same replica and the other one would never
train, never reach H inner steps and never ask for a round. The demo therefore runs this
module once per replica, each with `--avoid` naming the other replica's address: the same
Trainer, data pipeline and job registration as `pollinate train`, on a view of the swarm
without the avoided peers. Each trainer reads its own data file, as DiLoCo replicas do.

    python -m pollinate.demo_trainer --coordinator HOST:PORT --token-file F --job J \\
        --data part.jsonl --steps 12 --round-steps 4 --avoid 127.0.0.1:PORT_OF_OTHER_REPLICA

The job is registered at the coordinator as `pollinate train` registers it (the first trainer
creates it, the second finds the same settings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pollinate.client.cli_args import add_connection_arguments
from pollinate.client.cli_job import add_job_arguments, job_spec
from pollinate.client.cli_train import registered_config
from pollinate.client.swarm import Swarm

# Seconds one hop may take to answer a micro-batch's Backward: the hop that makes a replica's
# H-th inner step runs the round inside it, and the round waits for the other replica's
# trainer to reach the same step (up to the coordinator's --round-window).
HOP_TIMEOUT_S = 180.0


class AvoidingSwarm(Swarm):
    """The swarm as seen without the peers at the addresses in `avoid` (HOST:PORT)."""

    def __init__(self, *, avoid: frozenset[str], **kwargs):
        super().__init__(**kwargs)
        self.avoid = avoid

    async def peers(self, *, refresh: bool = False):
        return [p for p in await super().peers(refresh=refresh) if p.address not in self.avoid]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pollinate.demo_trainer", description=__doc__.split("\n")[0])
    p.add_argument("--job", required=True)
    p.add_argument("--data", type=Path, required=True, help="JSONL (text, or prompt/completion) or plain text")
    p.add_argument("--eval-fraction", type=float, default=0.125, help="held-out share of --data")
    add_connection_arguments(p)
    add_job_arguments(p)
    p.add_argument("--avoid", action="append", default=[], metavar="HOST:PORT", help="a peer not to train through")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args(argv)
    if args.coordinator is None:
        p.error("--coordinator is required: the job is registered there, as `pollinate train` does")
    return args


def main(argv: list[str] | None = None) -> int:
    from pollinate.client.cli_args import join_dht
    from pollinate.client.config import ClientConfig
    from pollinate.client.trainer import TrainConfig, Trainer
    from pollinate.client.training_data import batches, read_records, split, tokenize
    from pollinate.client.worker import LoopThread
    from pollinate.node.model_files import open_model
    from pollinate.protocol.errors import PollinateError

    args = parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    try:
        spec = job_spec(args)
        config = TrainConfig(job=args.job, spec=spec, steps=args.steps, batch_size=args.batch_size, seed=spec.seed)
        files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
        tok = files.tokenizer()
        examples = tokenize(read_records(args.data), tok, max_length=files.config.max_position_embeddings,
                            path=args.data)
        train, held = split(examples, args.eval_fraction, spec.seed)
        token, dht = join_dht(args)
    except ValueError as e:
        print(f"demo trainer: {e}", file=sys.stderr)
        return 2
    worker = LoopThread()
    swarm = AvoidingSwarm(avoid=frozenset(args.avoid), dht=dht, model_id=args.model, num_blocks=files.num_blocks,
                          config=ClientConfig(token=token))
    try:
        config = registered_config(args, config, token, worker)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        trainer = Trainer(swarm=swarm, worker=worker, client_part=files.load_client_part(), pad_id=pad,
                          config=config, timeout_s=HOP_TIMEOUT_S)
        history = trainer.train(batches(train, config.batch_size, config.seed), eval_examples=held, progress=False)
        print(json.dumps({**history[-1], "first_loss": history[0]["loss"]}))
        return 0
    except (ValueError, PollinateError) as e:
        print(f"demo trainer: {e}", file=sys.stderr)
        return 1
    finally:
        worker.run(swarm.close(), 5.0)
        worker.stop()
        dht.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
