"""Families other than Llama through real node processes on loopback (issue 19).

Per family, a swarm of three nodes hosts a tiny random model's spans [0:1], [1:3], [3:4]
(fp32 on the wire): greedy generation through it equals the family's model locally, and a
LoRA job on the family's default targets trains through it and exports a PEFT adapter that
reproduces the swarm's logits and its greedy generation with the job. Gemma 2 is the
family furthest from Llama (sliding-window and global layers mixed, attention and final
soft-capping, scaled embeddings, tied head); Phi-3 fuses q/k/v and gate/up, so its LoRA
targets differ (qkv_proj).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from procs import ProcGroup

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "unit"))
PROMPT = [1, 5, 9, 33, 70]  # 5 tokens + 12 new: past the tiny configs' 5-token sliding window
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["gemma2", "phi3"])
def swarm(request, tmp_path_factory):
    from test_families import make_tiny

    from pollinate.node.model_files import open_model

    model_type = request.param
    work = tmp_path_factory.mktemp(f"swarm-{model_type}")
    model_dir = make_tiny(model_type, work / "model")
    cache = work / "cache"
    open_model(model_dir, cache_dir=cache, show_progress=False)  # once, before the nodes read it
    group = ProcGroup(work)
    common = ["--model", str(model_dir), "--cache-dir", str(cache), "--torch-threads", "1", "--throughput", "100"]
    try:
        a = group.start("A", ["node", "--blocks", "0:1", *common])
        group.wait_ready([a], timeout=90)
        peers = ["--initial-peers", a.info["dht_maddrs"][0]]
        rest = [group.start(n, ["node", "--blocks", b, *common, *peers]) for n, b in (("B", "1:3"), ("C", "3:4"))]
        group.wait_ready(rest, timeout=120)
        yield {"type": model_type, "group": group, "maddr": a.info["dht_maddrs"][0], "work": work,
               "model": str(model_dir), "cache": str(cache)}
    except BaseException:
        print(group.dump_logs(), file=sys.stderr)
        raise
    finally:
        group.stop_all()


def _reference(swarm):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(swarm["model"]).eval()


def _run(swarm, cmd: list[str], timeout: float = 180) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:] + swarm["group"].dump_logs()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_remote_greedy_generation_equals_local(swarm):
    result = _run(swarm, [sys.executable, str(HERE / "serving_client.py"), "--model", swarm["model"],
                          "--cache-dir", swarm["cache"], "--initial-peers", swarm["maddr"],
                          "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS)])
    with torch.no_grad():
        local = _reference(swarm).generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS,
                                           min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(PROMPT):].tolist()
    assert [h[1:] for h in result["route"]] == [[0, 1], [1, 3], [3, 4]]
    assert result["tokens"] == local
    assert len(set(local)) > 1  # not one token repeated: a wrong window or cap would show


def test_lora_job_trains_and_its_peft_export_reproduces_the_swarm(swarm):
    from peft import PeftModel
    from safetensors.torch import load_file

    from pollinate.node.families import lora_targets

    out = swarm["work"] / "adapter"
    targets = ",".join(lora_targets(swarm["type"]))
    result = _run(swarm, [sys.executable, str(HERE / "finetune_client.py"), "--model", swarm["model"],
                          "--cache-dir", swarm["cache"], "--initial-peers", swarm["maddr"], "--out", str(out),
                          "--job", "fam", "--steps", "3", "--targets", targets])
    assert len(result["history"]) == 3
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(lora_targets(swarm["type"]))

    peft_model = PeftModel.from_pretrained(_reference(swarm), str(out)).eval()
    logits = load_file(str(out / "swarm_logits.safetensors"))
    with torch.no_grad():
        local = peft_model(logits["probe"]).logits
    gap = float((local - logits["logits"]).abs().max())
    base_gap = float((local - logits["base_logits"]).abs().max())
    print(f"{swarm['type']}: exported PEFT vs swarm-with-job logits max |diff| {gap:.3e} (vs base {base_gap:.3e})")
    assert gap <= 1e-5
    assert base_gap > 1e-3  # the job changed the model: the comparison is not vacuous

    gen = load_file(str(out / "swarm_generate.safetensors"))
    with torch.no_grad():
        local_gen = peft_model.generate(gen["prompt"], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(local_gen, gen["generated"]), (local_gen, gen["generated"])
