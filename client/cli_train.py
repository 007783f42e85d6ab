"""`pollinate train --job NAME --data FILE`: fine-tune a job's adapters through the swarm.

The data are read and checked (line numbers in errors) and the job's settings validated
before the client joins the swarm, so bad input never reaches a node. The job is defined
here and sent to the nodes with each call (node/training.py explains clashes); with
--coordinator it is also registered there first (client/cli_job.py), and a job already
registered gives its settings to the flags left out and refuses flags that differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pollinate.client.cli_args import add_connection_arguments

# The wire `pollinate train` uses unless --codec says otherwise (issue 12, bench_finetune.py
# over three seeds): int8row both ways held quality (held-out loss 0.89x fp32's on average,
# accuracy +7 points, final training loss +2.1%) at 5.2x fewer bytes per trained token than
# the fp32 wire before kept inputs; int4row with int4row-sr gradients (8.4x) held held-out
# quality too but ended training 37% higher in loss. docs/compression.md has the table.
# int8row-zstd is int8row with its body zstd-compressed: the same tensors bit for bit (so the
# same quality), in 0.54x int8row's bytes on bench_wan's batches (shared chat-template
# prefixes, padding and the last span's mostly-zero gradient; docs/compression.md).
# TrainConfig itself stays fp32 ("none"): exact, for tests and library callers.
DEFAULT_TRAIN_CODEC = "int8row-zstd"
from pollinate.client.cli_job import add_job_arguments, job_spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="job name; nodes keep its adapters under it")
    p.add_argument("--data", type=Path, required=True, help="JSONL (text, or prompt/completion) or plain text")
    p.add_argument("--eval-data", type=Path, help="held-out data (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of --data without --eval-data")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end)")
    add_connection_arguments(p)
    p.add_argument("--codec", default=DEFAULT_TRAIN_CODEC,
                   help="hidden states on the wire (Forward in and out): int8row-zstd (default: int8row, "
                        "zstd-compressed: the same values in about half its bytes on batches that share a "
                        "prompt prefix), int8row (8 bits, one scale per token, each token's 4 largest values "
                        "exact; 3.8x fewer bytes than fp32, same held-out quality on the benchmark), int4row "
                        "and int4row-zstd (4 bits, 6.2x fewer; held-out quality held but training loss ended "
                        "higher), fp16, none (fp32, exact); docs/compression.md has the measurements")
    p.add_argument("--grad-codec", default="",
                   help="gradients on the wire (Backward in and out): the same choices plus int4row-sr "
                        "(4 bits, stochastic rounding); default: as --codec")
    p.add_argument("--spot-check", type=float, default=0.0, metavar="RATE",
                   help="check this share of Backward hops on another replica with the hop's own adapter "
                        "(fetched first) and never use a node again whose gradient two others contradict; with "
                        "--coordinator it is reported (docs/security.md)")
    p.add_argument("--no-keep-inputs", dest="keep_inputs", action="store_false",
                   help="send each hop's input again with its Backward instead of letting the node keep it "
                        "from the Forward (more bytes; for nodes older than the keep_id field)")
    add_job_arguments(p)
    p.add_argument("--save", type=Path, help="write the trained job at the end (PEFT adapter, or a full checkpoint "
                                             "for full); required for prompt-tuning, whose prompt lives here only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--max-length", type=int, default=0, help="longest sequence in tokens (0: the model's context)")


def run(args: argparse.Namespace) -> int:
    from pollinate.client.training_data import DataError, load_examples, read_records, split, tokenize
    from pollinate.client.trainer import TrainConfig

    try:
        spec = job_spec(args)  # bad settings fail here; a registered job's settings replace them later
        check_save(spec, args)
        config = TrainConfig(job=args.job, spec=spec, steps=args.steps, batch_size=args.batch_size,
                             wire_codec=args.codec, grad_codec=args.grad_codec, keep_inputs=args.keep_inputs,
                             eval_every=args.eval_every, seed=spec.seed)
        records = read_records(args.data)  # format errors (line numbers) before loading anything
        from pollinate.node.model_files import open_model

        files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
        limit = args.max_length or files.config.max_position_embeddings
        tok = files.tokenizer()
        examples = tokenize(records, tok, max_length=limit, path=args.data)
        if args.eval_data:
            train, held = examples, load_examples(args.eval_data, tok, max_length=limit)
        else:
            train, held = split(examples, args.eval_fraction, spec.seed)
        if not train:
            raise DataError(f"{args.data}: no training examples left after the held-out split")
    except ValueError as e:  # DataError, bad settings: before anything joins the swarm
        print(f"pollinate train: {e}", file=sys.stderr)
        return 2
    return _train(args, files, tok, config, train, held)


def check_save(spec, args: argparse.Namespace) -> None:
    if spec.method == "prompt-tuning" and args.save is None:
        raise ValueError("--method prompt-tuning needs --save DIR: the soft prompt is trained here, "
                         "no node keeps it for a later export")


def registered_config(args, config, token: str, worker):
    """With --coordinator: the config with the job's settings as the coordinator registers
    them (registering it if new). ValueError or PollinateError (a clash names the fields)."""
    from dataclasses import replace

    from pollinate.client.cli_job import register_job
    from pollinate.protocol.shared import JobSpec

    if not args.coordinator:
        return config  # --initial-peers only: the job lives in request headers, as nodes create it
    info, created = worker.run(register_job(args.coordinator, token, config.job, args), 30.0)
    spec = JobSpec.from_proto(info.spec)
    check_save(spec, args)
    print(f"job {config.job!r} {'registered' if created else 'uses the registered settings'}: {spec}",
          file=sys.stderr)
    return replace(config, spec=spec, seed=spec.seed)


def _train(args, files, tok, config, train, held) -> int:
    from pollinate.client.cli_args import join_dht
    from pollinate.client.config import ClientConfig
    from pollinate.client.peft_export import export_job, gather_job
    from pollinate.client.prompt_tuning import PromptTuningTrainer
    from pollinate.client.swarm import Swarm
    from pollinate.client.trainer import Trainer
    from pollinate.client.training_data import batches
    from pollinate.client.worker import LoopThread
    from pollinate.protocol.errors import PollinateError

    try:
        token, dht = join_dht(args)
    except ValueError as e:
        print(f"pollinate train: {e}", file=sys.stderr)
        return 2
    worker = LoopThread()
    try:
        config = registered_config(args, config, token, worker)
    except (ValueError, PollinateError) as e:  # before any batch reaches a node
        print(f"pollinate train: {e}", file=sys.stderr)
        worker.stop()
        dht.shutdown()
        return 2
    swarm = Swarm(dht=dht, model_id=args.model, num_blocks=files.num_blocks, config=ClientConfig(
        token=token, spot_check_rate=args.spot_check, coordinator=args.coordinator or "",
        coordinator_tls=args.coordinator_tls))
    try:
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        prompt_tuning = config.spec.method == "prompt-tuning"
        trainer = (PromptTuningTrainer if prompt_tuning else Trainer)(
            swarm=swarm, worker=worker, client_part=files.load_client_part(), pad_id=pad, config=config)
        report = None
        if args.coordinator:  # the job's record and per-round losses (issue 15)
            from pollinate.client.training_report import TrainingReporter, data_file
            from pollinate.protocol.channels import coordinator_tls

            report = TrainingReporter(args.coordinator, token, config.job, worker=worker,
                                      tls=coordinator_tls(getattr(args, "coordinator_tls", None)))
            data_files = [data_file(args.data, "train", len(train))]
            if args.eval_data:
                data_files.append(data_file(args.eval_data, "heldout", len(held)))
            elif held:  # the held-out split is taken from --data: same file, its own count
                data_files.append(data_file(args.data, "heldout", len(held)))
            report.joined(data_files)
        history = trainer.train(batches(train, config.batch_size, config.seed), eval_examples=held, report=report)
        print(json.dumps(history[-1]))
        if args.save is not None:
            spec, state = ((config.spec, trainer.adapter_state()) if prompt_tuning
                           else worker.run(gather_job(swarm, config.job), 120.0 * (files.num_blocks + 1)))
            out = export_job(args.save, spec, state, files, base_model=args.model)
            print(f"saved job {config.job!r} ({spec.method}) to {out}", file=sys.stderr)
        return 0
    finally:
        worker.run(swarm.close(), 5.0)
        worker.stop()
        dht.shutdown()
