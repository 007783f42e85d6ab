"""Bottleneck adapters, LoReFT, GaLore, prefix tuning and LLaMA-Adapter (issue 14) through
real node processes.

1. Three nodes host the tiny model's spans [0:1], [1:3], [3:4]; a trainer process trains
   one job per method (fp32 wire) and exports it from the settings the nodes report. The
   swarm-trained state equals the same steps run locally on the whole transformers model
   (tests/unit/test_methods.py's reference; PEFT for prefix tuning and LLaMA-Adapter) to
   1e-5, the loss of a trained batch falls, and the export (AdapterHub / pyreft layout
   through client/method_export.py's loader, a full checkpoint for GaLore, a PEFT adapter
   for prefix tuning and LLaMA-Adapter) gives the swarm's logits with the job to 1e-5.
   Greedy generation through the swarm's Inference sessions (KV caches on the nodes) with
   the LoReFT, prefix and LLaMA-Adapter jobs equals greedy decoding of the exported model,
   recomputed over the whole sequence per token.
2. A coordinator and two replicas of span 0:4 train each method's job with H = 3: after
   6 steps round 2 is committed, and both replicas' committed state (θ_global and outer
   momentum of the method's flat vector) equals the coordinator's bit for bit.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from procs import ProcGroup
from rounds_swarm import start_swarm
from test_finetune import swarm  # noqa: F401  (the three-node swarm fixture)

CLIENT = Path(__file__).with_name("finetune_client.py")
ROUNDS_CLIENT = str(Path(__file__).with_name("rounds_client.py"))
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
METHODS = ["bottleneck", "reft", "galore", "prefix-tuning", "llama-adapter"]
# the flat vector of each method's job on the tiny model's 4 blocks at rank 4 (hidden 64,
# intermediate 128, 2 KV heads of 16): bottleneck 2 places x (4x64 + 4 + 64x4 + 64) per block;
# LoReFT (64x4 + 4x64 + 4) per block; GaLore every block parameter
# prefix tuning: 4 virtual tokens (rounds_client.py) x (K, V) x 2 KV heads x head dim 16 per block
NUMEL = {"bottleneck": 4 * 2 * (4 * 64 + 4 + 64 * 4 + 64), "reft": 4 * (64 * 4 + 4 * 64 + 4),
         "galore": 4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64), "prefix-tuning": 4 * 4 * 2 * 32,
         "llama-adapter": 4 * (4 * 64 + 1)}  # rank 4 = all 4 blocks: a prompt of 4 x 64 and a gate each


def test_swarm_trains_new_methods_like_local_and_exports(swarm, tiny_model_dir, tiny_cache_dir,  # noqa: F811
                                                        tiny_reference_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pollinate.client.method_export import load_method_adapter
    from pollinate.node.model_files import open_model
    from pollinate.protocol.shared import JobSpec
    from test_methods import local_run

    sys.path.insert(0, str(CLIENT.parent))
    from finetune_client import token_batches

    out = swarm["work"] / "new-methods"
    steps, micro, rank = 3, 2, 4
    cmd = [sys.executable, str(CLIENT), "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
           "--initial-peers", swarm["maddr"], "--out", str(out), "--job", "n", "--steps", str(steps),
           "--micro-batches", str(micro), "--methods", ",".join(METHODS), "--rank", str(rank)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + swarm["group"].dump_logs()
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    files = open_model(tiny_model_dir, cache_dir=tiny_cache_dir, show_progress=False)
    data = token_batches(steps * micro)
    for method in METHODS:
        # llama-adapter: the top 2 blocks (finetune_client's --adapter-layers), so span [0:1] holds none
        spec = JobSpec(method=method, rank=2 if method == "llama-adapter" else rank, alpha=8.0, lr=1e-2,
                       micro_batches=micro, grad_clip=0.0, seed=3,
                       num_virtual_tokens=4 if method in ("prefix-tuning", "llama-adapter") else 0)
        init, ref, losses = local_run(files, tiny_reference_model, spec, data, micro)
        if method in ("prefix-tuning", "llama-adapter"):
            exported = PeftModel.from_pretrained(copy.deepcopy(tiny_reference_model), str(out / method)).eval()
            got = load_file(str(out / method / "adapter_model.safetensors"))
        elif method == "galore":
            exported = AutoModelForCausalLM.from_pretrained(out / method).eval()
            got = {k: v for k, v in exported.state_dict().items() if k in ref}
        else:
            got = load_file(str(out / method / "adapter_model.safetensors"))
            exported = copy.deepcopy(tiny_reference_model)
            load_method_adapter(exported, out / method)
        assert set(got) == set(ref), method
        moved = max(float((got[k] - init[k]).abs().max()) for k in ref)
        diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        swarm_losses = [h["loss"] for h in result["history"][method]]
        logits = load_file(str(out / method / "swarm_logits.safetensors"))
        with torch.no_grad():
            gap = float((exported(logits["probe"]).logits - logits["logits"]).abs().max())
        first = result["first_batch_loss"][method]
        print(f"{method}: moved {moved:.3e}, swarm vs local {diff:.3e}, losses swarm "
              f"{[round(x, 5) for x in swarm_losses]} local {[round(x, 5) for x in losses]}, exported vs swarm "
              f"logits {gap:.3e}, first batch loss {first['base']:.4f} -> {first['trained']:.4f}")
        assert moved > 1e-3, method
        assert diff <= 1e-5, method
        assert swarm_losses == pytest.approx(losses, abs=1e-5), method
        assert gap <= 1e-5, method
        assert float((logits["logits"] - logits["base_logits"]).abs().max()) > 1e-3, method
        assert first["trained"] < first["base"], method
        if method in ("reft", "prefix-tuning", "llama-adapter"):
            gen = load_file(str(out / method / "swarm_generate.safetensors"))
            seq = gen["prompt"]
            with torch.no_grad():
                while seq.shape[1] < gen["generated"].shape[1]:
                    seq = torch.cat([seq, exported(seq).logits[:, -1:].argmax(-1)], dim=1)
            assert torch.equal(seq, gen["generated"]), (method, seq, gen["generated"])


@pytest.mark.parametrize("method", METHODS)
def test_two_replicas_round_each_method(tmp_path, tiny_model_dir, tiny_cache_dir, method):
    token = f"methods-{method}"
    with ProcGroup(tmp_path) as group:
        coord, nodes = start_swarm(group, tmp_path, tiny_model_dir, tiny_cache_dir, replicas=2, token=token)
        done = subprocess.run(
            [sys.executable, ROUNDS_CLIENT, "--coordinator", coord.info["grpc"], "--token", token,
             "--nodes", ",".join(n.info["address"] for n in nodes), "--steps", "6", "--round-steps", "3",
             "--no-overlap", "--expect-round", "2", "--method", method, "--job", f"r-{method}"],
            capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:] + group.dump_logs()
        result = json.loads(done.stdout.strip().splitlines()[-1])
        logs = group.dump_logs(200)
    assert result["round"] == 2, result
    assert result["replicas_equal_coordinator"] == [True, True], result
    assert result["numel"] == NUMEL[method], result  # the round moved this method's own flat vector
    assert result["inner_steps"] == [6, 6]
    assert result["finite"] and result["momentum_norm"] > 0, result
    assert logs.count("committed by 2/2 members") == 2, logs
