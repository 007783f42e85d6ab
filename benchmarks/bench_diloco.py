"""DiLoCo with CocktailSGD-compressed pseudo-gradients vs per-step data parallelism.

A byte-level tiny Llama (4 blocks, width 128) on the Python standard library's own source
(held-out files for validation) is pretrained once (cached), then every arm continues from
that checkpoint with 4 replicas that see the same tokens:

  ddp              gradients averaged every step (fp32)
  diloco           H inner steps, fp32 pseudo-gradients, the job's outer optimizer
  diloco-cocktail  H inner steps, the job's codec and error feedback, through
                   pollinate.node.diloco (the code the network layer calls)
  local            one replica alone
  diloco-paper     as diloco but with the DiLoCo paper's outer optimizer (Nesterov 0.7/0.9),
                   the best measured for fp32 rounds: the compressed arm is also compared
                   with it, so a ratio cannot be won by an outer lr that suits only the codec
  solo             one replica with the compressed arm's config: its rounds are groups of one
                   (a span with a single replica); compared with local, which has no rounds
  diloco-cocktail-overlap
                   the compressed arm with overlapped rounds, as a node runs them with
                   overlap_rounds (node/rounds.py): at each boundary the replicas snapshot and
                   go on training; round r is computed from the snapshots and lands
                   --overlap-delay inner steps later (θ_local ← local_start + progress since
                   the snapshot, node.diloco.overlap_restart). A node lets a round land at
                   most overlap_max_steps steps late (the Backward after that waits), so the
                   default delay, equal to it, is the node's worst case

One JSON object per arm on stdout. Bytes are what one replica sends + receives in the
owner exchange pattern (its contributions to the 3 other owners, the 3 others' contributions
to its shard, its shard result to the 3 others, the 3 others' results): the encoded frame
lengths for the DiLoCo arms, 4 bytes per element for ddp (the same pattern every step, i.e.
a reduce-scatter + all-gather).
Usage: python benchmarks/bench_diloco.py [--quick] [--seeds N] [--first-seed S] [--jobs J]
       [--arms A,B] [--lora R] [--overlap-delay STEPS] [--config JSON]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pollinate.node.diloco import (DiLoCoConfig, DiLoCoMember, assign_flat,
                                   exchange_in_process, flatten_params, job_diloco_config,
                                   overlap_restart, registry_codec)
from pollinate.protocol.shared import JobSpec

REPLICAS = 4
SEQ = 64  # tokens per sequence (bytes)
BATCH = 8  # sequences per replica per step
INNER_LR = 1e-3  # AdamW; the DiLoCo 4e-4 is for large models, tiny ones want more
VAL_SEQS = 256
LORA_LR = 3e-3  # inner AdamW lr with --lora (adapters take a larger step than full weights)
ARMS = ("ddp", "local", "diloco", "diloco-paper", "diloco-cocktail", "solo",
        "diloco-cocktail-overlap")  # the order they print in


def load_text() -> tuple[torch.Tensor, torch.Tensor]:
    """stdlib top-level .py files, sorted; every 8th file is held out for validation."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, val = [], []
    for i, path in enumerate(files):
        (val if i % 8 == 0 else train).append(Path(path).read_bytes())
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8)
    return as_tensor(train).long(), as_tensor(val).long()


def batch(text: torch.Tensor, n: int, key: tuple) -> torch.Tensor:
    """n windows of SEQ bytes at positions fixed by key (seed, replica, step)."""
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, text.numel() - SEQ, (n,), generator=gen)
    return torch.stack([text[s:s + SEQ] for s in starts.tolist()])


def make_model(quick: bool) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=256, hidden_size=128 if not quick else 64,
                      intermediate_size=344 if not quick else 172, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw(model: torch.nn.Module, lr: float = INNER_LR) -> torch.optim.Optimizer:
    # weight decay 0.1, betas 0.9/0.95: the DiLoCo/OpenDiLoCo inner optimizer
    return torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))


def train_step(model, opt, x: torch.Tensor) -> None:
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def val_loss(model, val: torch.Tensor) -> float:
    x = batch(val, VAL_SEQS, ("val",))
    return sum(float(model(input_ids=c, labels=c).loss) for c in x.split(32)) / len(x.split(32))


def pretrained(args, train: torch.Tensor) -> dict:
    """Pretrain once from scratch, cached by the settings that define it."""
    settings = repr((args.quick, args.pretrain_steps, SEQ, BATCH)).encode()
    key = hashlib.sha256(settings).hexdigest()[:12]
    path = Path(args.cache_dir).expanduser() / f"pretrain-{key}.pt"
    if path.exists():
        return torch.load(path)
    model = make_model(args.quick)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    for step in range(args.pretrain_steps):
        train_step(model, opt, batch(train, BATCH, ("pretrain", step)))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def fresh(args, state: dict):
    """The warm-start model, all weights trained; with --lora R, frozen under a PEFT LoRA of
    rank R on every linear layer of the blocks (the same seeded init in every replica)."""
    model = make_model(args.quick)
    model.load_state_dict(state)
    if not args.lora:
        return model, adamw(model)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    return model, adamw(model, LORA_LR)


def run_ddp(args, state, train, val, seed) -> dict:
    model, opt = fresh(args, state)
    for step in range(args.steps):
        for r in range(REPLICAS):  # mean of the replicas' gradients = one all-reduce
            x = batch(train, BATCH, (seed, r, step))
            (model(input_ids=x, labels=x).loss / REPLICAS).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    numel = sum(p.numel() for p in trainable(model))
    per_step = 4 * (REPLICAS - 1) * math.ceil(numel / REPLICAS) * 4  # fp32, see module doc
    return {"val_loss": val_loss(model, val), "bytes_per_replica": per_step * args.steps}


def run_local(args, state, train, val, seed) -> dict:
    model, opt = fresh(args, state)
    for step in range(args.steps):
        train_step(model, opt, batch(train, BATCH, (seed, 0, step)))
    return {"val_loss": val_loss(model, val), "bytes_per_replica": 0}


def run_diloco(args, state, train, val, seed, config: DiLoCoConfig, num_replicas: int = REPLICAS) -> dict:
    replicas = [fresh(args, state) for _ in range(num_replicas)]
    params = [trainable(m) for m, _ in replicas]
    members = [DiLoCoMember(flatten_params(params[0]), config, codec_factory=args.codec_factory)
               for _ in range(num_replicas)]
    moved, rounds, step = 0, 0, 0
    while step < args.steps:
        h = min(config.inner_steps, args.steps - step)
        for r, (model, opt) in enumerate(replicas):
            assign_flat(params[r], members[r].local_start())
            for s in range(step, step + h):
                train_step(model, opt, batch(train, BATCH, (seed, r, s)))
        report = exchange_in_process(members, [flatten_params(p) for p in params],
                                     [h * BATCH * SEQ] * num_replicas, round_index=rounds + 1)
        if len(set(report.checksums)) != 1 or report.rejected:
            raise RuntimeError(f"round {rounds}: members diverged or rejected {report.rejected}")
        moved += sum(report.bytes_per_member) // num_replicas
        step, rounds = step + h, rounds + 1
    final, _ = replicas[0]
    assign_flat(params[0], members[0].global_flat)  # the committed global model is evaluated
    return {"val_loss": val_loss(final, val), "bytes_per_replica": moved, "rounds": rounds}


def run_diloco_overlapped(args, state, train, val, seed, config: DiLoCoConfig, delay: int) -> dict:
    """run_diloco with overlapped rounds (module doc): the same members, rounds and tokens;
    only when each round's outer update reaches θ_local differs. delay 0 is run_diloco."""
    replicas = [fresh(args, state) for _ in range(REPLICAS)]
    params = [trainable(m) for m, _ in replicas]
    members = [DiLoCoMember(flatten_params(params[0]), config, codec_factory=args.codec_factory)
               for _ in range(REPLICAS)]
    moved, rounds, since = 0, 0, 0
    pending = None  # (round index, the replicas' snapshots, tokens each, step it lands after)

    def land() -> None:
        nonlocal moved, pending
        index, snapshots, tokens, _ = pending
        report = exchange_in_process(members, snapshots, [tokens] * REPLICAS, round_index=index)
        if len(set(report.checksums)) != 1 or report.rejected:
            raise RuntimeError(f"round {index}: members diverged or rejected {report.rejected}")
        moved += sum(report.bytes_per_member) // REPLICAS
        for r in range(REPLICAS):
            now = flatten_params(params[r])
            assign_flat(params[r], overlap_restart(members[r].local_start(), now, snapshots[r]))
        pending = None

    for step in range(args.steps):
        for r, (model, opt) in enumerate(replicas):
            train_step(model, opt, batch(train, BATCH, (seed, r, step)))
        since += 1
        if pending is not None and step + 1 >= pending[3]:
            land()
        if since == config.inner_steps or step + 1 == args.steps:
            if pending is not None:  # still out at the boundary: the node's Backward waits here
                land()
            pending = (rounds + 1, [flatten_params(p) for p in params], since * BATCH * SEQ, step + 1 + delay)
            rounds, since = rounds + 1, 0
            if delay == 0:  # lands before the next step: the blocking round
                land()
    if pending is not None:
        land()  # the last round: the committed global model is evaluated, as in run_diloco
    final, _ = replicas[0]
    assign_flat(params[0], members[0].global_flat)
    return {"val_loss": val_loss(final, val), "bytes_per_replica": moved, "rounds": rounds}


def arm_configs(args) -> dict[str, DiLoCoConfig]:
    """The DiLoCo arms' configs: the compressed one from --config over the defaults a job gets
    (with --lora: an adapter job's, node/diloco.py job_diloco_config), the dense ones sharing
    its H and outer optimizer, and the paper's outer optimizer."""
    overrides = json.loads(args.config)
    if args.quick:
        overrides.setdefault("inner_steps", 10)
    base = job_diloco_config(JobSpec()) if args.lora else DiLoCoConfig()
    # the arm says how its rounds run (diloco-cocktail blocking, -overlap overlapped), not the default
    cocktail = dataclasses.replace(base, **overrides, overlap_rounds=False)
    dense = DiLoCoConfig(inner_steps=cocktail.inner_steps, outer_lr=cocktail.outer_lr,
                         outer_momentum=cocktail.outer_momentum, nesterov=cocktail.nesterov,
                         codec="none", codec_params={}, overlap_rounds=False)
    paper = dataclasses.replace(dense, outer_lr=0.7, outer_momentum=0.9, nesterov=True)
    return {"diloco": dense, "diloco-paper": paper, "diloco-cocktail": cocktail, "solo": cocktail,
            "diloco-cocktail-overlap": dataclasses.replace(cocktail, overlap_rounds=True)}


def run_arm(args, name: str, seed: int) -> dict:
    """One (arm, seed) run; deterministic, so runs may go to separate processes."""
    torch.set_num_threads(args.threads)
    train, val = load_text()
    state = pretrained(args, train)
    if name == "ddp":
        return run_ddp(args, state, train, val, seed)
    if name == "local":
        return run_local(args, state, train, val, seed)
    if name == "solo":
        return run_diloco(args, state, train, val, seed, arm_configs(args)["solo"], num_replicas=1)
    if name == "diloco-cocktail-overlap":
        return run_diloco_overlapped(args, state, train, val, seed, arm_configs(args)[name],
                                     args.overlap_delay)
    return run_diloco(args, state, train, val, seed, arm_configs(args)[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke run (< 60 s)")
    ap.add_argument("--seeds", type=int, default=1, help="data-order seeds per arm")
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first..first+N-1 "
                    "(every seed's run is deterministic: splitting seeds across processes "
                    "gives the same per-seed numbers as one --seeds run)")
    ap.add_argument("--cache-dir", default="~/.cache/pollinate/bench_diloco")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, help="inner steps per replica after the warm start")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--lora", type=int, default=0, metavar="R", help="train a rank-R LoRA on every "
                    "linear layer instead of all weights (the pretrained checkpoint is the same); the "
                    "DiLoCo arms then start from an adapter job's round settings, as `pollinate train` "
                    "gets them (--config overrides either)")
    ap.add_argument("--jobs", type=int, default=1, help="runs (arm, seed) in parallel processes; "
                    "the numbers do not depend on it (2 on a 2-core machine halves the wall time)")
    ap.add_argument("--overlap-delay", type=int, default=DiLoCoConfig().overlap_max_steps,
                    metavar="STEPS", help="inner steps an overlapped round takes to land "
                    "(diloco-cocktail-overlap). Default: DiLoCoConfig.overlap_max_steps, the "
                    "latest a node lets it land (its Backward waits then), i.e. the node's worst "
                    "case; >= H = one round late (Eager Updates' naive delayed outer step); "
                    "0 = blocking")
    ap.add_argument("--config", default="{}", help="JSON overrides of DiLoCoConfig fields for "
                    "the compressed arm (the diloco arm shares H and the outer optimizer)")
    args = ap.parse_args()
    args.steps = args.steps or (30 if args.quick else 300)
    args.pretrain_steps = args.pretrain_steps or (100 if args.quick else 400)
    args.codec_factory = registry_codec
    names = args.arms.split(",")
    unknown = sorted(set(names) - set(ARMS))
    if unknown or args.jobs < 1 or args.seeds < 1 or args.overlap_delay < 0:
        ap.error(f"--arms takes {', '.join(ARMS)} (got {', '.join(unknown)})" if unknown
                 else "--jobs and --seeds must be >= 1, --overlap-delay >= 0")
    configs = arm_configs(args)
    torch.set_num_threads(args.threads)
    pretrained(args, load_text()[0])  # once, before any worker reads the cache
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    t0 = time.time()
    with concurrent.futures.ProcessPoolExecutor(args.jobs) if args.jobs > 1 else \
            contextlib.nullcontext() as pool:
        submit = pool.submit if pool is not None else _Later
        futures = {(name, seed): submit(run_arm, args, name, seed) for name in names for seed in seeds}
        results: dict[str, dict] = {}
        for name in names:  # printed in --arms order, each as soon as its seeds are done
            runs = [futures[name, seed].result() for seed in seeds]
            out = {"arm": name, "val_loss": sum(r["val_loss"] for r in runs) / len(runs),
                   "seeds": seeds, "val_loss_per_seed": [round(r["val_loss"], 4) for r in runs],
                   "bytes_per_replica": runs[0]["bytes_per_replica"], "steps": args.steps,
                   "elapsed_s": round(time.time() - t0, 1)}  # since the start, when this arm ended
            if name in configs:
                out["config"] = {k: v for k, v in dataclasses.asdict(configs[name]).items()
                                 if k != "reject_norm_factor"}
            if name == "diloco-cocktail":
                if "ddp" in results:
                    ratio = results["ddp"]["bytes_per_replica"] / out["bytes_per_replica"]
                    out["bytes_reduction_vs_ddp"] = round(ratio, 1)
                for base in ("ddp", "diloco", "diloco-paper"):
                    if base in results:
                        ratio = out["val_loss"] / results[base]["val_loss"]
                        out[f"loss_ratio_vs_{base.replace('-', '_')}"] = round(ratio, 4)
                if "local" in results:
                    out["beats_local"] = out["val_loss"] < results["local"]["val_loss"]
            if name == "diloco-cocktail-overlap":
                out["overlap_delay_steps"] = args.overlap_delay
                if "diloco-cocktail" in results:  # the same rounds, blocking
                    ratio = out["val_loss"] / results["diloco-cocktail"]["val_loss"]
                    out["loss_ratio_vs_blocking"] = round(ratio, 4)
                for base in ("ddp", "diloco-paper"):
                    if base in results:
                        ratio = out["val_loss"] / results[base]["val_loss"]
                        out[f"loss_ratio_vs_{base.replace('-', '_')}"] = round(ratio, 4)
            if name == "solo" and "local" in results:  # a lone replica's rounds must not hurt it
                out["loss_ratio_vs_local"] = round(out["val_loss"] / results["local"]["val_loss"], 4)
            results[name] = out
            print(json.dumps(out), flush=True)


class _Later:
    """A call made when its result() is asked for (--jobs 1: no pool, runs in print order)."""

    def __init__(self, fn, *args) -> None:
        self._call = (fn, args)

    def result(self):
        fn, args = self._call
        return fn(*args)


if __name__ == "__main__":
    main()
