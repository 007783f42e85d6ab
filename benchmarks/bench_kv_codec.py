"""The handoff's KV-cache codec on real SmolLM2 caches: size, error, and the next tokens.

    python benchmarks/bench_kv_codec.py [--quick] [--prompts 12] [--context 512] [--tokens 16]

For each prompt (windows of --context tokens of the repository's own docs/*.md, real
English text), the whole model's 30 blocks prefill one KV cache (node/span.py, as a node
holds it), which is then handed off through each codec setting (encode, decode, restore:
node/handoff.py) and greedy decoding continues for --tokens tokens from the restored cache.
The reference is the same continuation from the untouched cache (an uncompressed handoff).
One JSON object per line: per setting ``mode``, ``bits``, ``key_deltas``, ``kv_ratio_vs_fp16`` (frame bytes
/ fp16 cache bytes), ``rel_error_keys`` / ``rel_error_values`` (||x - x̂|| / ||x||),
``max_abs_error``, ``prompts_identical`` (prompts whose --tokens next tokens all equal the
reference's), ``token_agreement`` (fraction of positions equal before the first
divergence, over all prompts), ``encode_ms`` / ``decode_ms`` (median per cache); then a
``summary`` row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pollinate.compression.kv_codec import KVCodecConfig, decode_kv, encode_kv, fp16_bytes
from pollinate.node.handoff import cache_layers, restore_cache
from pollinate.node.model_files import open_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("lossless", 8, True), ("lossy", 8, True), ("lossy", 6, True), ("lossy", 4, True)]


def prompts(tokenizer, count: int, context: int) -> list[torch.Tensor]:
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    stride = max(context, (len(ids) - context) // max(count, 1))
    windows = [ids[i:i + context] for i in range(0, len(ids) - context + 1, stride)][:count]
    if len(windows) < count:
        raise SystemExit(f"docs/ hold {len(ids)} tokens: not enough for {count} windows of {context}")
    return [w.unsqueeze(0) for w in windows]


@torch.inference_mode()
def greedy(span, part, cache, last_hidden: torch.Tensor, tokens: int) -> list[int]:
    out, hidden = [], last_hidden
    for _ in range(tokens):
        token = int(part.logits(hidden[:, -1:]).argmax(-1))
        out.append(token)
        hidden = span(part.embed(torch.tensor([[token]])), cache=cache)
    return out


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
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default); "
                   "1 on a shared machine, where more threads than free cores slow torch down many times")
    p.add_argument("--ablate-key-deltas", action="store_true",
                   help="also the lossy settings without delta-coded keys (rows with key_deltas false)")
    p.add_argument("--quick", action="store_true", help="2 prompts of 64 tokens, 4 next tokens")
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.quick:
        args.prompts, args.context, args.tokens = 2, 64, 4
    torch.manual_seed(0)
    files = open_model(args.model, cache_dir=args.cache_dir, show_progress=False)
    span = files.load_span(0, files.num_blocks)
    part = files.load_client_part()
    settings = SETTINGS + ([(m, b, False) for m, b, _ in SETTINGS if m == "lossy"] if args.ablate_key_deltas else [])
    rows = {s: {"bytes": 0, "fp16": 0, "ek": [], "ev": [], "max": 0.0, "same": 0, "agree": 0, "enc": [], "dec": []}
            for s in settings}
    total = 0
    for n, ids in enumerate(prompts(files.tokenizer(), args.prompts, args.context), start=1):
        max_length = ids.shape[1] + args.tokens
        with torch.inference_mode():
            cache = span.new_cache(1, max_length)
            hidden = span(part.embed(ids), cache=cache)
        layers = [(k.clone(), v.clone()) for k, v in cache_layers(cache)]
        reference = greedy(span, part, cache, hidden, args.tokens)
        total += args.tokens
        for mode, bits, deltas in settings:
            row = rows[(mode, bits, deltas)]
            t0 = time.perf_counter()
            blob = encode_kv(layers, KVCodecConfig(mode=mode, bits=bits, group_tokens=args.group, delta_keys=deltas))
            t1 = time.perf_counter()
            decoded = decode_kv(blob, max_elements=sum(k.numel() + v.numel() for k, v in layers))
            t2 = time.perf_counter()
            row["enc"].append(t1 - t0)
            row["dec"].append(t2 - t1)
            row["bytes"] += len(blob)
            row["fp16"] += fp16_bytes(layers)
            keys = torch.cat([k.flatten() for k, _ in layers])
            values = torch.cat([v.flatten() for _, v in layers])
            keys_hat = torch.cat([k.flatten() for k, _ in decoded.layers]).float()
            values_hat = torch.cat([v.flatten() for _, v in decoded.layers]).float()
            row["ek"].append(float((keys - keys_hat).norm() / keys.norm()))
            row["ev"].append(float((values - values_hat).norm() / values.norm()))
            row["max"] = max(row["max"], float((keys - keys_hat).abs().max()), float((values - values_hat).abs().max()))
            with torch.inference_mode():
                restored = restore_cache(span, decoded.layers, batch_size=1, max_length=max_length,
                                         position=ids.shape[1])
            got = greedy(span, part, restored, hidden, args.tokens)
            row["same"] += got == reference
            row["agree"] += agreement(got, reference)
        print(f"prompt {n}/{args.prompts} done", file=sys.stderr, flush=True)
    summary = {"summary": True, "prompts": args.prompts, "context": args.context, "tokens": args.tokens}
    for (mode, bits, deltas), row in rows.items():
        out = {
            "mode": mode, "bits": bits if mode == "lossy" else None,
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
