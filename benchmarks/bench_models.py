"""Every supported model family, exact through spans and through a real swarm (issue 19).

For each family in node/families.py, a seeded random model of that family (built on the
fly, offline: tests/unit/test_families.py's configs, with sliding windows shorter than
the sequences) is converted into per-block shards, then:

- span_max_abs_diff: logits with every block run as its own span, chained, against the
  full transformers model (fp32; target <= 1e-5);
- tokens_match: greedy generation through node processes on loopback (two spans, fp32 on
  the wire) against the family's model generating locally;
- lora_export_max_diff: a LoRA job on the family's default targets trained through that
  swarm (3 AdamW steps, 1 with --quick), exported in PEFT format and loaded by
  peft.PeftModel.from_pretrained on the family's model: its logits against the swarm's
  logits with the job (target <= 1e-5); lora_moved_logits says the job changed the model;
- params_per_block and fp32 bytes_per_block as node/sizing.py counts them on the family's
  own decoder layer.

One JSON object per family on stdout; then one per quantisation on the embedded SmolLM2
(node/quant.py; --quant, default int8,int4), against the fp32 spans on a held-out English
text (Python's own LICENSE.txt, the first --quant-tokens tokens; a fixed text that no
quantisation saw):

- bytes_per_block: the blocks' weights as stored (values, scales, zero points), per block;
  memory_ratio: that / fp32's; sizing_bytes_per_block: what node/sizing.py budgets;
- max_abs_diff, mean_abs_diff: logits of the quantised swarm against the fp32 swarm;
- top1_agreement: share of positions whose argmax token is the same;
- perplexity, perplexity_fp32, perplexity_ratio (quantised / fp32) on the text.

Every figure but the bytes comes from a swarm: for fp32 and each quantisation, three node
processes on loopback (blocks 0:10, 10:20, 20:30, started with that --quant, fp32 on the
wire) and a client that runs the text through them once; swarm_vs_spans_max_diff compares
that swarm's logits with the same three spans run in this process (deterministic: 0
expected), so the swarm carries exactly what the spans compute.

    python benchmarks/bench_models.py [--quick] [--families qwen2,gemma2] [--quant int8,int4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_swarm import local_swarm  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))
CLIENTS = ROOT / "tests" / "integration"
# Larger than the unit tests' configs (hidden 64, 4 blocks) unless --quick; head_dim 16 as
# the Gemma and Qwen3 test configs set it.
FULL_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4)


def bench_family(model_type: str, workdir: Path, *, quick: bool, new_tokens: int, lora_steps: int,
                 extra: list[str]) -> dict:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_families import WINDOW, make_tiny
    from transformers import AutoModelForCausalLM

    from pollinate.node.families import FAMILIES, lora_targets
    from pollinate.node.model_files import open_model
    from pollinate.node.sizing import BlockShape

    t0 = time.perf_counter()
    work = workdir / model_type
    model_dir = make_tiny(model_type, work / "model", **({} if quick else FULL_SIZES))
    cache = work / "cache"
    files = open_model(model_dir, cache_dir=cache, show_progress=False)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    n = files.num_blocks

    ids = torch.randint(3, 256, (2, 4 * WINDOW), generator=torch.Generator().manual_seed(1))
    client = files.load_client_part()
    spans = [files.load_span(i, i + 1) for i in range(n)]
    with torch.no_grad():
        h = client.embed(ids)
        for span in spans:
            h = span(h)
        span_diff = float((client.logits(h) - reference(ids).logits).abs().max())

    prompt = [1, 5, 9, 33, 70]
    with torch.no_grad():
        local = reference.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False)[0, len(prompt):].tolist()
    common = ["--model", str(model_dir), "--cache-dir", str(cache), "--initial-peers"]
    with local_swarm(work / "swarm", model=str(model_dir), cache_dir=str(cache),
                     spans=[(0, n // 2), (n // 2, n)], extra=extra) as swarm:
        gen = _run([sys.executable, str(CLIENTS / "serving_client.py"), *common, swarm.maddr,
                    "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(new_tokens)], swarm)
        out = work / "adapter"
        _run([sys.executable, str(CLIENTS / "finetune_client.py"), *common, swarm.maddr, "--out", str(out),
              "--job", "bench", "--steps", str(lora_steps), "--targets", ",".join(lora_targets(model_type))], swarm)
    peft_model = PeftModel.from_pretrained(reference, str(out)).eval()
    swarm_logits = load_file(str(out / "swarm_logits.safetensors"))
    with torch.no_grad():
        exported = peft_model(swarm_logits["probe"]).logits
    shape = BlockShape.from_config(files.config)
    return {
        "bench": "models",
        "family": model_type,
        "name": FAMILIES[model_type].name,
        "blocks": n,
        "hidden_size": files.hidden_size,
        "layer_types": sorted(set(spans[0].layer_types).union(*(s.layer_types for s in spans))),
        "span_max_abs_diff": span_diff,
        "tokens_match": gen["tokens"] == local,
        "new_tokens": new_tokens,
        "lora_targets": list(lora_targets(model_type)),
        "lora_steps": lora_steps,
        "lora_export_max_diff": float((exported - swarm_logits["logits"]).abs().max()),
        "lora_moved_logits": float((swarm_logits["logits"] - swarm_logits["base_logits"]).abs().max()),
        "params_per_block": shape.params_per_block(),
        "bytes_per_block": shape.params_per_block() * 4,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def bench_quant(modes: list[str], *, tokens: int, cache_dir: str | None, workdir: Path,
                extra: list[str]) -> list[dict]:
    import math

    import torch

    from pollinate.node.model_files import open_model
    from pollinate.node.quant import span_weight_bytes
    from pollinate.node.sizing import BlockShape

    files = open_model(None, cache_dir=cache_dir, show_progress=False)
    text = (Path(json.__file__).parents[1] / "LICENSE.txt").read_text()  # the stdlib's own copy
    ids = files.tokenizer()(text, return_tensors="pt").input_ids[:, :tokens]
    client = files.load_client_part()
    bounds = [(0, 10), (10, 20), (20, 30)]
    shape = BlockShape.from_config(files.config)

    def run(quant: str):
        spans = [files.load_span(s, e, quant=quant) for s, e in bounds]
        with torch.inference_mode():
            h = client.embed(ids)
            for span in spans:
                h = span(h)
            local = client.logits(h)[0]
        per_block = sum(span_weight_bytes(span.layers) for span in spans) / files.num_blocks
        del spans
        out = workdir / f"logits-{quant}.pt"
        with local_swarm(workdir / f"swarm-{quant}", model="smollm2", cache_dir=cache_dir, spans=bounds,
                         extra=[*extra, "--quant", quant]) as swarm:
            _run([sys.executable, str(CLIENTS / "serving_client.py"), "--model", "smollm2", "--cache-dir",
                  str(cache_dir), "--initial-peers", swarm.maddr, "--codec", "none",
                  "--prompt-ids", ",".join(map(str, ids[0].tolist())), "--logits-out", str(out)], swarm)
        logits = torch.load(out)
        out.unlink()
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
        return logits, per_block, math.exp(float(nll)), float((logits - local).abs().max())

    base, base_bytes, base_ppl, base_swarm_diff = run("none")
    rows = []
    for quant in modes:
        t0 = time.perf_counter()
        logits, per_block, ppl, swarm_diff = run(quant)
        diff = (logits - base).abs()
        rows.append({
            "bench": "models-quant",
            "model": "smollm2-135m-instruct",
            "quant": quant,
            "tokens": int(ids.shape[1]),
            "bytes_per_block": round(per_block),
            "fp32_bytes_per_block": round(base_bytes),
            "memory_ratio": round(per_block / base_bytes, 4),
            "sizing_bytes_per_block": shape.weight_bytes_per_block(torch.float32, quant),
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "top1_agreement": float((logits.argmax(-1) == base.argmax(-1)).float().mean()),
            "perplexity": round(ppl, 4),
            "perplexity_fp32": round(base_ppl, 4),
            "perplexity_ratio": round(ppl / base_ppl, 5),
            "via": "swarm",
            "swarm_vs_spans_max_diff": swarm_diff,
            "fp32_swarm_vs_spans_max_diff": base_swarm_diff,
            "seconds": round(time.perf_counter() - t0, 1),
        })
    return rows


def _run(cmd: list[str], swarm) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[1]).name} failed:\n{proc.stderr[-3000:]}\n{swarm.group.dump_logs()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    from pollinate.node.families import FAMILIES

    p = argparse.ArgumentParser(description="every model family: spans and swarm against the local model")
    p.add_argument("--quick", action="store_true", help="the unit tests' 4-block configs, 8 tokens, 1 LoRA step")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated model types [all]; '' for none")
    p.add_argument("--quant", default="int8,int4", help="quantisations measured on SmolLM2 [int8,int4]; '' for none")
    p.add_argument("--quant-tokens", type=int, default=1024, help="tokens of the held-out text (--quick: 256)")
    p.add_argument("--cache-dir", help="where SmolLM2 is converted [$POLLINATE_CACHE or ~/.cache/pollinate]")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per node")
    p.add_argument("--workdir", type=Path, help="keep models and node logs here (default: a temp dir)")
    args = p.parse_args()
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-models-"))
    extra = ["--torch-threads", str(args.torch_threads), "--throughput", "100"]
    for family in families:
        result = bench_family(family, workdir, quick=args.quick, new_tokens=8 if args.quick else 24,
                              lora_steps=1 if args.quick else 3, extra=extra)
        print(json.dumps(result), flush=True)
    modes = [q for q in args.quant.split(",") if q]
    if modes:
        from pollinate.node.cli_convert import cache_dir_from_cli

        for row in bench_quant(modes, tokens=256 if args.quick else args.quant_tokens,
                               cache_dir=str(cache_dir_from_cli(args.cache_dir)), workdir=workdir / "quant",
                               extra=extra):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
