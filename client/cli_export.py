"""`pollinate export --job NAME DIR`: gather a job's state and settings from the spans and
write it as a PEFT adapter (or a full checkpoint for `full`): client/peft_export.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pollinate.client.cli_args import add_connection_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="directory for adapter_config.json + adapter_model.safetensors "
                                          "(or a full checkpoint for method full)")
    p.add_argument("--job", required=True)
    add_connection_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pollinate.client.cli_args import join_dht
    from pollinate.client.config import ClientConfig
    from pollinate.client.peft_export import export_job, gather_job
    from pollinate.client.swarm import Swarm
    from pollinate.client.worker import LoopThread
    from pollinate.node.model_files import open_model
    from pollinate.protocol.errors import NotFound, PollinateError

    try:
        token, dht = join_dht(args)
    except ValueError as e:
        print(f"pollinate export: {e}", file=sys.stderr)
        return 2
    files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
    worker = LoopThread()
    swarm = Swarm(dht=dht, model_id=args.model, num_blocks=files.num_blocks, config=ClientConfig(token=token))
    try:
        spec, state = worker.run(gather_job(swarm, args.job), 120.0 * (files.num_blocks + 1))
        out = export_job(args.out, spec, state, files, base_model=args.model)
        print(f"wrote {len(state)} tensors of job {args.job!r} ({spec.method}) to {out}")
        return 0
    except NotFound as e:
        print(f"pollinate export: {e}; a prompt-tuning job is kept by its trainer only "
              f"(`pollinate train --save DIR` writes it)", file=sys.stderr)
        return 1
    except (ValueError, PollinateError) as e:
        print(f"pollinate export: {e}", file=sys.stderr)
        return 1
    finally:
        worker.run(swarm.close(), 5.0)
        worker.stop()
        dht.shutdown()
