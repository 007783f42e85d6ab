"""`pollinate export --job NAME DIR`: gather a job's adapters from the spans, write PEFT files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pollinate.client.cli_args import add_connection_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="directory for adapter_config.json + adapter_model.safetensors")
    p.add_argument("--job", required=True)
    add_connection_arguments(p)
    p.add_argument("--rank", type=int, default=8, help="the job's LoRA rank (as trained)")
    p.add_argument("--alpha", type=float, default=16.0, help="the job's LoRA alpha (as trained)")
    p.add_argument("--targets", default="q_proj,v_proj")


def run(args: argparse.Namespace) -> int:
    from pollinate.client.cli_args import join_dht
    from pollinate.client.config import ClientConfig
    from pollinate.client.peft_export import write_peft_adapter
    from pollinate.client.swarm import Swarm
    from pollinate.client.trainer import Trainer, TrainConfig
    from pollinate.client.worker import LoopThread
    from pollinate.node.model_files import open_model
    from pollinate.node.training import JobSpec

    spec = JobSpec(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(",")))
    try:
        token, dht = join_dht(args)
    except ValueError as e:
        print(f"pollinate export: {e}", file=sys.stderr)
        return 2
    files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
    worker = LoopThread()
    swarm = Swarm(dht=dht, model_id=args.model, num_blocks=files.num_blocks, config=ClientConfig(token=token))
    try:
        trainer = Trainer(swarm=swarm, worker=worker, client_part=None, pad_id=0,
                          config=TrainConfig(job=args.job, spec=spec))
        state = trainer.adapter_state()
        out = write_peft_adapter(args.out, state, spec, base_model=args.model)
        print(f"wrote {len(state)} tensors to {out}")
        return 0
    finally:
        worker.run(swarm.close(), 5.0)
        worker.stop()
        dht.shutdown()
