"""A client process for serving tests and chaos runs: generate through the swarm, print JSON.

    python serving_client.py --model DIR --cache-dir C --initial-peers MADDR \
        --prompt-ids 1,5,9 --max-new-tokens 12 [--pause-after 5] [--sample-seed 0 (adds a sampled run)] [--exact]
        [--spot-check-rate 1.0 (with --coordinator: the result lists the liars banned and reported)]
        [--logits-out FILE (one forward of the prompt, its logits saved; no generation)]

With --pause-after N it prints `PAUSED <json: route>` after the N-th generated token and
waits for a line on stdin before going on: the test kills a node in between, so the fault
lands at a known token. The last stdout line is the result JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir")
    p.add_argument("--initial-peers", nargs="*", default=[])
    p.add_argument("--coordinator", help="HOST:PORT: DHT peers from the coordinator (needs --token)")
    p.add_argument("--swarm-ca", help="a --data-tls swarm's CA certificate, for --initial-peers alone")
    p.add_argument("--prompt-ids", required=True)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--pause-after", type=int, default=0)
    p.add_argument("--sample-seed", type=int, default=None)
    p.add_argument("--codec", default="none")
    p.add_argument("--token")
    p.add_argument("--step-timeout", type=float, default=20.0)
    p.add_argument("--exact", action="store_true", help="route through unquantised nodes only")
    p.add_argument("--logits-out", help="instead of generating, run the prompt through the swarm once and save "
                                        "its logits [tokens, vocab] here (torch.save)")
    p.add_argument("--no-handoff", action="store_true", help="send no resume digest: leaving nodes hand nothing off")
    p.add_argument("--spot-check-rate", type=float, default=0.0,
                   help="share of hop steps checked on other replicas; liars go to --coordinator with evidence")
    args = p.parse_args()

    from pollinate.client.remote_model import RemoteModelForCausalLM  # DHT before any gRPC object

    model = RemoteModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, coordinator=args.coordinator, cache_dir=args.cache_dir, token=args.token,
        wire_codec=args.codec, step_timeout_s=args.step_timeout, ban_base_s=60.0, exact=args.exact,
        handoff=not args.no_handoff, swarm_ca=args.swarm_ca, spot_check_rate=args.spot_check_rate,
    )
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Pause(BaseStreamer):
        def __init__(self):
            self.generated = 0
            self.first = True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            self.generated += 1
            if self.generated == args.pause_after:
                route = [[str(h.peer.address), h.start, h.end] for h in model.active_session.route]
                print("PAUSED " + json.dumps(route), flush=True)
                sys.stdin.readline()

        def end(self):
            pass

    ids = torch.tensor([[int(x) for x in args.prompt_ids.split(",")]])
    if args.logits_out:
        t0 = time.perf_counter()
        with torch.no_grad():
            torch.save(model(ids).logits[0].float(), args.logits_out)
        print(json.dumps({"logits": args.logits_out, "seconds": time.perf_counter() - t0}), flush=True)
        model.shutdown()
        return 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False)
    t0 = time.perf_counter()
    with model.inference_session(max_length=ids.shape[1] + args.max_new_tokens) as session:
        out = model.generate(ids, streamer=Pause() if args.pause_after else None, **kwargs)
        result = {
            "tokens": out[0, ids.shape[1]:].tolist(),
            "route": [[str(h.peer.address), h.start, h.end] for h in session.route],
            "failovers": session.failovers,
            "reroutes": session.reroutes,
            "handoffs": session.handoffs,
            "recovery_s": session.recovery_seconds,
            "seconds": time.perf_counter() - t0,
        }
    if args.sample_seed is not None:  # a second, sampled generation (its own session)
        torch.manual_seed(args.sample_seed)
        out = model.generate(ids, **{**kwargs, "do_sample": True, "top_k": 20, "temperature": 1.0})
        result["sampled_tokens"] = out[0, ids.shape[1]:].tolist()
    model.shutdown()  # waits for its liar reports to be answered
    result["liars"] = sorted(model.swarm.liars)  # peer ids
    result["reports"] = [[r.quarantined, r.reporters, r.verdict] for r in model.swarm.reports]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
