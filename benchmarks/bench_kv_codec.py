"""The handoff's frames on real SmolLM2 caches: size, error, and the next tokens.

    python benchmarks/bench_kv_codec.py [--quick] [--prompts 12] [--context 512] [--tokens 16]
                                        [--blocks 10:20] [--steps-before 8] [--wire none|fp16]

For each prompt (windows of --context tokens of the repository's own docs/*.md, real
English text), the model runs as three parts: the blocks before --blocks, the handed-off
span --blocks (default: the whole model) and the blocks after it, each with its own KV
cache (node/span.py, as nodes hold them). The prompt is one prefill, then --steps-before
greedy tokens one step at a time (a session mid-generation); then the span's session is
handed off through each setting and greedy decoding continues for --tokens tokens:

- ``lossless`` / ``lossy``: the span's cache is encoded, decoded and restored
  (compression/kv_codec.py, node/handoff.py restore_cache);
- ``recompute``: the span's inputs so far (what its node received, at --wire's precision)
  are encoded (the span-inputs frame) and decoded, and a fresh cache is rebuilt by one
  prefill of them, as the receiving node does (and as a client's replay would).

The reference is the same continuation from the untouched caches (an uncompressed
handoff). One JSON object per line: per setting ``mode``, ``bits``, ``key_deltas``,
``kv_ratio_vs_fp16`` (frame bytes / fp16 bytes of the span's cache), ``rel_error_keys`` /
``rel_error_values`` (||x - x̂|| / ||x|| of the cache the receiver ends up with),
``max_abs_error``, ``prompts_identical`` (prompts whose --tokens next tokens all equal the
reference's), ``token_agreement`` (fraction of positions equal before the first
divergence, over all prompts), ``encode_ms`` / ``decode_ms`` (median per session; decode
includes recompute's prefill); then a ``summary`` row.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pollinate.compression.kv_codec import (
    KVCodecConfig,
    decode_inputs,
    decode_kv,
    encode_inputs,
    encode_kv,
    fp16_bytes,
)
from pollinate.node.handoff import cache_layers, restore_cache
from pollinate.node.model_files import open_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("recompute", 0, True), ("lossless", 8, True), ("lossy", 8, True), ("lossy", 6, True),
            ("lossy", 4, True)]


def prompts(tokenizer, count: int, context: int) -> list[torch.Tensor]:
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    stride = max(context, (len(ids) - context) // max(count, 1))
    windows = [ids[i:i + context] for i in range(0, len(ids) - context + 1, stride)][:count]
    if len(windows) < count:
        raise SystemExit(f"docs/ hold {len(ids)} tokens: not enough for {count} windows of {context}")
    return [w.unsqueeze(0) for w in windows]


class Model:
    """The model as three parts around the handed-off span, on the client part's embeddings and
    head; `wire` rounds what enters the span as the wire would (fp16) or not (none)."""

    def __init__(self, files, start: int, end: int, wire: str):
        self.part = files.load_client_part()
        n = files.num_blocks
        self.before = files.load_span(0, start) if start > 0 else None
        self.span = files.load_span(start, end)
        self.after = files.load_span(end, n) if end < n else None
        self.wire = wire

    def caches(self, max_length: int) -> list:
        return [None if s is None else s.new_cache(1, max_length) for s in (self.before, self.span, self.after)]

    def span_input(self, ids: torch.Tensor, before_cache) -> torch.Tensor:
        h = self.part.embed(ids)
        if self.before is not None:
            h = self.before(h, cache=before_cache)
        return h.half().float() if self.wire == "fp16" else h

    def rest(self, x: torch.Tensor, caches) -> torch.Tensor:
        h = self.span(x, cache=caches[1])
        return h if self.after is None else self.after(h, cache=caches[2])


@torch.inference_mode()
def greedy(model: Model, caches, last_hidden: torch.Tensor, tokens: int,
           inputs: list | None = None) -> tuple[list[int], torch.Tensor]:
    """`tokens` greedy tokens from `caches` and the last output; the span's inputs are appended
    to `inputs`."""
    out, hidden = [], last_hidden
    for _ in range(tokens):
        token = int(model.part.logits(hidden[:, -1:]).argmax(-1))
        out.append(token)
        x = model.span_input(torch.tensor([[token]]), caches[0])
        if inputs is not None:
            inputs.append(x)
        hidden = model.rest(x, caches)
    return out, hidden


def agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--context", type=int, default=512, help="tokens of context per prompt")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens compared after the handoff")
    p.add_argument("--group", type=int, default=64, help="lossy: tokens per scale group")
    p.add_argument("--blocks", default="", help="START:END, the handed-off span (default: the whole model)")
    p.add_argument("--steps-before", type=int, default=8,
                   help="greedy tokens generated one step at a time before the handoff (default 8)")
    p.add_argument("--wire", choices=("none", "fp16"), default="none",
                   help="precision of the span's inputs as its node received them (default none: fp32)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default); "
                   "1 on a shared machine, where more threads than free cores slow torch down many times")
    p.add_argument("--ablate-key-deltas", action="store_true",
                   help="also the lossy settings without delta-coded keys (rows with key_deltas false)")
    p.add_argument("--quick", action="store_true", help="2 prompts of 64 tokens, 2 steps before, 4 next tokens")
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.quick:
        args.prompts, args.context, args.tokens, args.steps_before = 2, 64, 4, 2
    torch.manual_seed(0)
    files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
    start, end = (int(x) for x in args.blocks.split(":")) if args.blocks else (0, files.num_blocks)
    model = Model(files, start, end, args.wire)
    span = model.span
    settings = SETTINGS + ([(m, b, False) for m, b, _ in SETTINGS if m == "lossy"] if args.ablate_key_deltas else [])
    rows = {s: {"bytes": 0, "fp16": 0, "ek": [], "ev": [], "max": 0.0, "same": 0, "agree": 0, "enc": [], "dec": []}
            for s in settings}
    total = 0
    for n, ids in enumerate(prompts(files.tokenizer(), args.prompts, args.context), start=1):
        max_length = ids.shape[1] + args.steps_before + args.tokens
        position = ids.shape[1] + args.steps_before
        with torch.inference_mode():
            caches = model.caches(max_length)
            x = model.span_input(ids, caches[0])
            inputs = [x]
            hidden = model.rest(x, caches)
            _, last = greedy(model, caches, hidden, args.steps_before, inputs)
        # the session at the handoff: the span's cache, the other parts' caches, the last output
        layers = [(k.clone(), v.clone()) for k, v in cache_layers(caches[1])]
        history = torch.cat(inputs, dim=1)
        others = copy.deepcopy([caches[0], caches[2]])
        reference, _ = greedy(model, caches, last, args.tokens)
        total += args.tokens
        for mode, bits, deltas in settings:
            row = rows[(mode, bits, deltas)]
            t0 = time.perf_counter()
            if mode == "recompute":
                blob = encode_inputs(history)
            else:
                blob = encode_kv(layers, KVCodecConfig(mode=mode, bits=bits, group_tokens=args.group,
                                                       delta_keys=deltas))
            t1 = time.perf_counter()
            with torch.inference_mode():
                if mode == "recompute":
                    restored = span.new_cache(1, max_length)
                    span(decode_inputs(blob, max_elements=history.numel()), cache=restored)
                    got_layers = cache_layers(restored)
                else:
                    decoded = decode_kv(blob, max_elements=sum(k.numel() + v.numel() for k, v in layers))
                    restored = restore_cache(span, decoded.layers, batch_size=1, max_length=max_length,
                                             position=position)
                    got_layers = decoded.layers
            t2 = time.perf_counter()
            row["enc"].append(t1 - t0)
            row["dec"].append(t2 - t1)
            row["bytes"] += len(blob)
            row["fp16"] += fp16_bytes(layers)
            keys = torch.cat([k.flatten() for k, _ in layers])
            values = torch.cat([v.flatten() for _, v in layers])
            keys_hat = torch.cat([k.flatten() for k, _ in got_layers]).float()
            values_hat = torch.cat([v.flatten() for _, v in got_layers]).float()
            row["ek"].append(float((keys - keys_hat).norm() / keys.norm()))
            row["ev"].append(float((values - values_hat).norm() / values.norm()))
            row["max"] = max(row["max"], float((keys - keys_hat).abs().max()), float((values - values_hat).abs().max()))
            fresh = copy.deepcopy(others)
            got, _ = greedy(model, [fresh[0], restored, fresh[1]], last, args.tokens)
            row["same"] += got == reference
            row["agree"] += agreement(got, reference)
        print(f"prompt {n}/{args.prompts} done", file=sys.stderr, flush=True)
    summary = {"summary": True, "prompts": args.prompts, "context": args.context, "tokens": args.tokens,
               "steps_before": args.steps_before, "blocks": f"{start}:{end}", "wire": args.wire}
    for (mode, bits, deltas), row in rows.items():
        out = {
            "mode": mode, "bits": bits if mode == "lossy" else None, "blocks": f"{start}:{end}", "wire": args.wire,
            "group_tokens": args.group if mode == "lossy" else None,
            "key_deltas": deltas if mode == "lossy" else None,
            "kv_ratio_vs_fp16": round(row["bytes"] / row["fp16"], 4),
            "rel_error_keys": float(f"{statistics.mean(row['ek']):.3g}"),
            "rel_error_values": float(f"{statistics.mean(row['ev']):.3g}"),
            "max_abs_error": float(f"{row['max']:.3g}"),
            "prompts_identical": f"{row['same']}/{args.prompts}",
            "token_agreement": round(row["agree"] / total, 4),
            "encode_ms": round(1000 * statistics.median(row["enc"]), 1),
            "decode_ms": round(1000 * statistics.median(row["dec"]), 1),
        }
        print(json.dumps(out), flush=True)
        if not deltas:
            continue
        summary[f"{mode}{bits if mode == 'lossy' else ''}_ratio"] = out["kv_ratio_vs_fp16"]
        summary[f"{mode}{bits if mode == 'lossy' else ''}_identical"] = out["prompts_identical"]
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
