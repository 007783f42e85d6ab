"""`pollinate chat`: an interactive loop on one inference session (the nodes keep the history)."""

from __future__ import annotations

import argparse
import sys

from pollinate.client.cli_args import add_swarm_arguments, load_model, print_route, sampling_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_swarm_arguments(p)
    p.add_argument("--max-length", type=int, default=2048, help="tokens the whole conversation may hold")


def run(args: argparse.Namespace) -> int:
    model = load_model(args)  # starts the DHT peer: before any gRPC object
    try:
        import torch
        from transformers import TextStreamer

        tok = model.model_files.tokenizer()
        messages: list[dict] = []
        ids = torch.zeros(1, 0, dtype=torch.long)
        print("chat through the swarm; empty line or Ctrl-D to quit", file=sys.stderr)
        with model.inference_session(max_length=args.max_length) as session:
            while True:
                try:
                    line = input("> ").strip()
                except EOFError:
                    break
                if not line:
                    break
                messages.append({"role": "user", "content": line})
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                # The session holds `ids`; send only what the template adds after their text,
                # so the nodes' caches stay valid (re-tokenizing the reply could differ).
                done = tok.decode(ids[0]) if ids.shape[1] else ""
                if not text.startswith(done):
                    print("(chat template does not extend the conversation; stopping)", file=sys.stderr)
                    break
                suffix = tok(text[len(done):], return_tensors="pt", add_special_tokens=False).input_ids
                new_ids = torch.cat([ids, suffix], dim=1)
                room = args.max_length - new_ids.shape[1]
                if room <= 0:
                    print("(conversation reached --max-length)", file=sys.stderr)
                    break
                streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
                out = model.generate(new_ids, max_new_tokens=min(args.max_new_tokens, room), streamer=streamer,
                                     **sampling_kwargs(args))
                ids = out
                reply = tok.decode(out[0, new_ids.shape[1]:], skip_special_tokens=True)
                messages.append({"role": "assistant", "content": reply})
                if args.show_route:
                    print_route(session)
        return 0
    finally:
        model.shutdown()
