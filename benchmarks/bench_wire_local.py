"""Wire codecs at the span boundaries of SmolLM2, in one process: loss and gradient fidelity.

Runs the trainer's path for one batch of bench_finetune.py's task locally, with the spans
[0:10], [10:20], [20:30] and the codec applied wherever a tensor would cross the wire: each
hop's input and output (Forward), each hop's output gradient (Backward, with the hop's
forward recomputed from its decoded input, as a node does). Prints one JSON object per
(activation codec, gradient codec): the batch's loss and, per hop, the cosine similarity
of the input gradient with fp32's. Seconds per row on a CPU; no swarm.

`--sizes CODECS` prints instead, per codec, the encoded bytes per token row of every tensor the
trainer's wire carries for that batch (fp32 wire values; what the zstd variants find to
compress depends on the data: `--data examples/train.jsonl` takes a batch of
bench_wan.py's chat data, seeded as bench_wan splits and shuffles it).

    python benchmarks/bench_wire_local.py [--examples 8] [--seed 0]
    python benchmarks/bench_wire_local.py --sizes int8row,int8row-zstd --data examples/train.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_finetune import addition_records  # benchmarks/ is on sys.path when run as a script

SPANS = [(0, 10), (10, 20), (20, 30)]
WIRES = [("none", "none"), ("fp16", "fp16"), ("int8", "int8"), ("int8row", "int8row"), ("int8row", "int4row"),
         ("int8row", "int4row-sr"), ("int4row", "int4row"), ("int4row", "int4row-sr")]


def main() -> int:
    p = argparse.ArgumentParser(description="wire codecs at SmolLM2's span boundaries, locally")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outliers", type=int, default=-1, help="override the row codecs' exact outliers per row")
    p.add_argument("--sizes", default="", help="comma-separated codecs: bytes per row of each wire tensor instead")
    p.add_argument("--data", type=Path, help="JSONL training data for the batch (default: bench_finetune's sums)")
    args = p.parse_args()
    import torch

    from pollinate.client.training_data import causal_lm_loss, collate, tokenize
    from pollinate.compression import get_codec
    from pollinate.node.model_files import open_model

    torch.set_num_threads(1)
    files = open_model("smollm2", show_progress=False)
    tok = files.tokenizer()
    if args.data:
        from pollinate.client.training_data import batches, read_records, split

        train, _ = split(tokenize(read_records(args.data), tok, max_length=2048, path=args.data), 0.1, args.seed)
        examples = next(batches(train, args.examples, args.seed))
    else:
        recs, _ = addition_records(args.examples, 0, args.seed)
        examples = tokenize(list(enumerate(recs, 1)), tok, max_length=2048, path=Path("<addition>"))
    ids, labels = collate(examples, tok.pad_token_id or 0)
    part = files.load_client_part()
    spans = [files.load_span(a, b) for a, b in SPANS]

    def wire(codec_id: str):
        params = {"outliers": args.outliers} if args.outliers >= 0 and "row" in codec_id else {}
        codec = get_codec(codec_id, **params)
        return lambda x: codec.decode(codec.encode(x.detach()))

    def run(act, grad):
        h, inputs = part.embed(ids).detach(), []
        for span in spans:
            h = act(h)
            inputs.append(h)
            with torch.no_grad():
                h = act(span(h))
        out = h.requires_grad_(True)
        loss = causal_lm_loss(part.logits(out), labels)
        loss.backward()
        g, grads = out.grad, []
        for span, x in zip(reversed(spans), reversed(inputs)):
            x = x.detach().requires_grad_(True)
            span(x).backward(grad(g))
            g = x.grad
            grads.append(g)
        return float(loss.detach()), grads[::-1]

    if args.sizes:
        return sizes(args, run, ids, examples, [c for c in args.sizes.split(",") if c])
    base_loss, base_grads = run(wire("none"), wire("none"))
    for act_id, grad_id in WIRES:
        loss, grads = run(wire(act_id), wire(grad_id))
        cos = [float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
               for a, b in zip(grads, base_grads)]
        print(json.dumps({"bench": "wire_local", "codec": act_id, "grad_codec": grad_id, "examples": args.examples,
                          "seed": args.seed, "outliers": args.outliers, "loss": round(loss, 4),
                          "loss_fp32": round(base_loss, 4), "grad_cosine_per_hop": [round(c, 4) for c in cos]}),
              flush=True)
    return 0


def sizes(args, run, ids, examples, codecs) -> int:
    """Bytes per token row of each tensor on the trainer's wire, per codec (fp32 values)."""
    from pollinate.compression import get_codec

    seen: list = []  # (kind, tensor) in the order they cross: Forward, then Backward

    def tap(kind):
        def f(x):
            seen.append((kind, x.detach().clone()))
            return x
        return f

    run(tap("hidden"), tap("grad"))
    hops = len(SPANS)
    # what crosses: hop inputs and outputs, each hop's output gradient, the input gradients of
    # hops after the first (the trainer asks the first hop for none: its input is the embeddings)
    forward = [x for kind, x in seen if kind == "hidden"]  # in, out, in, out, ...
    grads_out = [x for kind, x in seen if kind == "grad"]  # last hop first
    tensors = [(f"hop {i // 2} {'input' if i % 2 == 0 else 'output'}", x) for i, x in enumerate(forward)]
    tensors += [(f"hop {hops - 1 - i} output gradient", g) for i, g in enumerate(grads_out)]
    tensors += [(f"hop {hops - 1 - i} input gradient", g) for i, g in enumerate(grads_out[1:])]
    rows = ids.shape[0] * ids.shape[1]
    for codec_id in codecs:
        codec = get_codec(codec_id)
        per = {name: round(len(codec.encode(x)) / rows, 1) for name, x in tensors}
        print(json.dumps({"bench": "wire_sizes", "codec": codec_id, "data": str(args.data or "sums"),
                          "examples": args.examples, "seed": args.seed, "rows": rows,
                          "real_tokens": sum(len(e.input_ids) for e in examples),
                          "bytes_per_row": per, "tensors": len(per),
                          "bytes_per_row_all": round(sum(per.values()), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
