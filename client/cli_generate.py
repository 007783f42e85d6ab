"""`pollinate generate "prompt"`: generate through the swarm, streaming tokens as they come."""

from __future__ import annotations

import argparse

from pollinate.client.cli_args import add_swarm_arguments, load_model, print_route, sampling_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (wrapped in the model's chat template unless --raw)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--job", help="generate with this training job's adapter (the job must exist on the nodes)")
    p.add_argument("--soft-prompt", metavar="DIR", help="generate with a trained soft prompt: the directory "
                   "`pollinate train --method prompt-tuning --save DIR` wrote")
    add_swarm_arguments(p)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)  # starts the DHT peer: before any gRPC object
    try:
        if args.soft_prompt:
            model.load_soft_prompt(args.soft_prompt)
        from transformers import TextStreamer

        tok = model.model_files.tokenizer()
        if args.raw or not tok.chat_template:
            text = args.prompt
        else:
            text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").input_ids
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        with model.inference_session(max_length=ids.shape[1] + args.max_new_tokens) as session:
            model.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling_kwargs(args))
            if args.show_route:
                print_route(session)
        return 0
    finally:
        model.shutdown()
