"""`pollinate export --job NAME DIR`: gather a job's state and settings from the spans and
write it as a PEFT adapter (or a full checkpoint for `full`): client/peft_export.py.

`pollinate export --job NAME --round N DIR --coordinator HOST:PORT`: the job as it stood
at round N, from the checkpoints the coordinator keeps (client/checkpoints.py): every span
at its latest kept round <= N, said on stdout and in DIR/checkpoint.json; no node is asked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pollinate.client.cli_args import add_connection_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="directory for adapter_config.json + adapter_model.safetensors "
                                          "(or a full checkpoint for method full)")
    p.add_argument("--job", required=True)
    p.add_argument("--round", type=int, metavar="N",
                   help="the job as it stood at round N: each span's latest checkpoint <= N kept by the "
                        "coordinator (needs --coordinator; no node is asked)")
    add_connection_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pollinate.client.cli_args import join_dht
    from pollinate.client.config import ClientConfig
    from pollinate.client.peft_export import export_job, gather_job
    from pollinate.client.swarm import Swarm
    from pollinate.client.worker import LoopThread
    from pollinate.node.model_files import open_model
    from pollinate.protocol.errors import NotFound, PollinateError

    if args.round is not None:
        return export_round(args)
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


def export_round(args: argparse.Namespace) -> int:
    """--round N: from the coordinator's checkpoints."""
    import asyncio

    from pollinate.client.checkpoints import fetch_checkpoint, job_history, peft_state, write_checkpoint_note
    from pollinate.client.cli_args import swarm_token
    from pollinate.client.peft_export import export_job
    from pollinate.node.model_files import open_model
    from pollinate.protocol.errors import PollinateError

    token = swarm_token(args)
    if not args.coordinator or not token:
        print("pollinate export: --round needs --coordinator and the swarm token", file=sys.stderr)
        return 2
    if args.round < 1:
        print(f"pollinate export: --round must be >= 1, got {args.round}", file=sys.stderr)
        return 2
    try:
        files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)

        from pollinate.protocol.channels import coordinator_tls

        tls = coordinator_tls(args.coordinator_tls)

        async def fetch():
            history = await job_history(args.coordinator, token, args.job, **tls)
            return await fetch_checkpoint(args.coordinator, token, history, round_index=args.round, **tls)

        point = asyncio.run(fetch())
        out = export_job(args.out, point.spec, peft_state(point, files), files, base_model=args.model)
        write_checkpoint_note(out, point)
    except (ValueError, PollinateError) as e:
        print(f"pollinate export: {e}", file=sys.stderr)
        return 1
    for s in point.spans:
        print(f"blocks {s.span[0]}:{s.span[1]}: round {s.round}" + ("" if s.round == args.round else
                                                                     f" (the latest kept <= {args.round})"))
    print(f"wrote job {args.job!r} ({point.spec.method}) at round {args.round} to {out}")
    return 0
