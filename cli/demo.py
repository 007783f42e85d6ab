"""`pollinate demo`: the embedded model, cut into spans, answers a chat prompt.

Interim version, before the swarm exists: every span runs in this process. The steps are the
ones the swarm will take, so each will later move behind a network hop:

1. open the embedded SmolLM2 (converted into per-block shards on the first run);
2. load the client part (embeddings, norm, LM head) and N spans of blocks;
3. greedy decoding: embed, run each span with its own KV cache, pick the next token, stream it;
4. run the same prompt on the whole local model and compare the tokens.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPT = "What is the capital of France?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pollinate.node.cli_convert import add_cache_dir_argument

    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--spans", type=int, default=3, help="how many spans to cut the model into (default: %(default)s)")
    parser.add_argument("--model", default=None, help="a model other than the embedded SmolLM2")
    add_cache_dir_argument(parser)


def split_blocks(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges of near-equal size covering all blocks: 30 in 3 -> 0:10, 10:20, 20:30."""
    if not 0 < parts <= num_blocks:
        raise ValueError(f"cannot cut {num_blocks} blocks into {parts} spans")
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run(args: argparse.Namespace) -> int:
    import torch

    from pollinate.node.cli_convert import cache_dir_from_cli
    from pollinate.node.model_files import ModelError, open_model

    # 1. The model's files: converted once, then read per block.
    try:
        files = open_model(args.model, cache_dir=cache_dir_from_cli(args.cache_dir))
        ranges = split_blocks(files.num_blocks, args.spans)
    except (ModelError, ValueError) as e:
        print(f"pollinate demo: {e}", file=sys.stderr)
        return 2
    print(f"model: {files.manifest.source}, {files.num_blocks} blocks, cache {files.path}")

    # 2. What a client holds, and what each node would hold.
    client = files.load_client_part()
    spans = [files.load_span(start, end) for start, end in ranges]
    print("spans: " + ", ".join(f"[{s.start}, {s.end})" for s in spans))

    tokenizer = files.tokenizer()
    messages = [{"role": "user", "content": args.prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text, return_tensors="pt").input_ids
    eos = files.generation_config().eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    print(f"\nuser: {args.prompt}\nspans answer: ", end="", flush=True)

    # 3. Greedy decoding through the spans; each span keeps its session's KV cache.
    t0 = time.monotonic()
    with torch.no_grad():
        caches = [span.new_cache(max_length=prompt_ids.shape[1] + args.max_new_tokens) for span in spans]
        step, tokens, shown = prompt_ids, [], ""
        while len(tokens) < args.max_new_tokens:
            hidden = client.embed(step)
            for span, cache in zip(spans, caches):
                hidden = span(hidden, cache=cache)
            step = client.logits(hidden)[:, -1].argmax(-1, keepdim=True)
            tokens.append(step.item())
            if tokens[-1] in eos_ids:
                break
            # Decode the whole answer so far: a token may be half of a multi-byte character.
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            print(answer[len(shown):], end="", flush=True)
            shown = answer
    span_s = time.monotonic() - t0
    print(f"\n({len(tokens)} tokens in {span_s:.1f} s through {len(spans)} spans)")

    # 4. The same prompt on the whole local model: the reference the swarm must equal.
    t0 = time.monotonic()
    model = files.load_reference_model()
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    local = out[0, prompt_ids.shape[1]:].tolist()
    print(f"local answer: {tokenizer.decode(local, skip_special_tokens=True)}")
    print(f"({len(local)} tokens in {time.monotonic() - t0:.1f} s on the whole model)")
    print(f"\nspan tokens:  {tokens}\nlocal tokens: {local}")
    if tokens != local:
        print("MISMATCH: the spans and the local model disagree", file=sys.stderr)
        return 1
    print("match: the spans produce exactly the local model's tokens")
    return 0
