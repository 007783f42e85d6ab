"""`pollinate analyze --job NAME --data FILE`: memorisation across a job's checkpoints.

    pollinate analyze --job sums --coordinator HOST:PORT --data train.jsonl [--heldout held.jsonl]
                      [--rounds 1,2,4,8] [--plot sums.png] [--out sums-analysis.jsonl]

For each kept checkpoint (or each round of --rounds: the job as it stood then, every span at
its latest kept round <= it), locally: the base model from the cache with the adapter at
that round, the training and held-out examples scored (client/analysis.py). One JSON object
per analysed round on stdout (or --out): round, train_loss, heldout_loss, gap,
verbatim_train, verbatim_heldout and the per-example losses; then a short report on stderr.
Without --heldout the held-out examples are --data's held-out split, as `pollinate train`
made it (--eval-fraction, the job's seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pollinate.client.cli_args import add_connection_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True)
    p.add_argument("--data", type=Path, required=True, help="the training data (JSONL or text, as for train)")
    p.add_argument("--heldout", type=Path, help="held-out data (default: --data's held-out split, as train made it)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of --data without --heldout "
                                                                    "(train's default)")
    p.add_argument("--rounds", help="comma-separated rounds to analyse (default: every kept checkpoint)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="draw loss and verbatim rates per round "
                                                                 "(needs matplotlib: pip install 'pollinate[plot]')")
    p.add_argument("--out", type=Path, help="write the JSON lines here instead of stdout")
    p.add_argument("--store", action=argparse.BooleanOptionalAction, default=True,
                   help="send the per-round results to the coordinator, which draws them on the job's status "
                        "page (default: on)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=0, help="longest example in tokens (0: the model's context)")
    add_connection_arguments(p)


def parse_rounds(text: str | None, kept: list[int]) -> list[int]:
    if not text:
        return kept
    try:
        rounds = sorted({int(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise ValueError(f"--rounds {text!r}: comma-separated round numbers") from None
    if not rounds or rounds[0] < 1:
        raise ValueError(f"--rounds {text!r}: rounds are >= 1")
    return rounds


def run(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from pollinate.client import analysis
    from pollinate.client.checkpoints import fetch_checkpoint, job_history, kept_rounds
    from pollinate.client.cli_args import swarm_token
    from pollinate.client.training_data import load_examples, read_records, split, tokenize
    from pollinate.node.model_files import open_model
    from pollinate.protocol.channels import coordinator_tls
    from pollinate.protocol.errors import PollinateError

    prog = "pollinate analyze"
    token = swarm_token(args)
    if not args.coordinator or not token:
        print(f"{prog}: needs --coordinator and the swarm token (the checkpoints are kept there)", file=sys.stderr)
        return 2
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"{prog}: --plot needs matplotlib (pip install 'pollinate[plot]')", file=sys.stderr)
            return 2
    tls = coordinator_tls(args.coordinator_tls)
    try:
        files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
        tok = files.tokenizer()
        limit = args.max_length or files.config.max_position_embeddings
        history = asyncio.run(job_history(args.coordinator, token, args.job, **tls))
        rounds = parse_rounds(args.rounds, kept_rounds(history))
        if not rounds:
            raise ValueError(f"job {args.job!r} has no kept checkpoint yet")
        examples = tokenize(read_records(args.data), tok, max_length=limit, path=args.data)
        if args.heldout:
            train, held = examples, load_examples(args.heldout, tok, max_length=limit)
        else:
            train, held = split(examples, args.eval_fraction, history.job.spec.seed)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        base = files.load_reference_model()
        rows, blocks = [], {}  # blocks: each span's weights, read once for every round
        out = open(args.out, "w") if args.out else sys.stdout
        try:
            with tqdm(total=len(rounds) * (len(train) + len(held)), desc=f"analyse {args.job}", unit="example",
                      file=sys.stderr) as bar:
                for r in rounds:
                    point = asyncio.run(fetch_checkpoint(args.coordinator, token, history, round_index=r, **tls))
                    model = analysis.model_at(point, files, base, base_model=args.model, blocks=blocks)
                    row = analysis.round_summary(r, point, analysis.score(model, train, pad_id=pad,
                                                                        batch_size=args.batch_size, progress=bar),
                                                 analysis.score(model, held, pad_id=pad, batch_size=args.batch_size,
                                                                progress=bar))
                    del model
                    rows.append(row)
                    print(json.dumps(row), file=out, flush=True)
        finally:
            if args.out:
                out.close()
    except (ValueError, PollinateError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    print(analysis.report(args.job, rows), file=sys.stderr)
    if args.store and rows:
        try:
            stored = asyncio.run(store_analysis(args, token, tls, rows))
            print(f"stored the analysis of {stored} round(s) at the coordinator (the job's status page draws it)",
                  file=sys.stderr)
        except PollinateError as e:  # the results are printed already: say so, and fail
            print(f"{prog}: could not store the analysis at the coordinator: {e}", file=sys.stderr)
            return 1
    if args.plot is not None:
        print(f"plot: {analysis.plot(args.job, rows, args.plot)}", file=sys.stderr)
    return 0


async def store_analysis(args: argparse.Namespace, token: str, tls: dict, rows: list[dict]) -> int:
    """ReportAnalysis: the per-round means and rates, with the data files' SHA-256."""
    from pollinate.client.training_report import file_digest
    from pollinate.coordinator.client import call_coordinator
    from pollinate.protocol.v1 import coordinator_pb2

    keys = ("round", "train_loss", "heldout_loss", "verbatim_train", "verbatim_heldout", "train_examples",
            "heldout_examples")
    request = coordinator_pb2.ReportAnalysisRequest(
        job=args.job, data_sha256=file_digest(args.data)[1],
        heldout_sha256=file_digest(args.heldout)[1] if args.heldout else "",
        rounds=[coordinator_pb2.AnalysisRound(**{k: r[k] for k in keys if r[k] is not None}) for r in rows])
    reply = await call_coordinator(args.coordinator, token, "ReportAnalysis", request, **tls)
    return reply.stored
