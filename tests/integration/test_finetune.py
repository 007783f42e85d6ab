"""Fine-tuning through a real local swarm: three node processes host the tiny model's
spans [0:1], [1:3], [3:4]; trainer processes train jobs through them (fp32 on the wire) -
LoRA, then IA3, LN tuning, full and prompt tuning - and export them. Checks: the
swarm-trained state equals the same steps run locally on the whole model (PEFT; plain
torch for full) to 1e-5, and the export, loaded by peft.PeftModel.from_pretrained (or
AutoModelForCausalLM for full), gives the swarm's logits with the job.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from procs import ProcGroup

CLIENT = Path(__file__).with_name("finetune_client.py")
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, tiny_model_dir, tiny_model_files, tiny_cache_dir):
    work = tmp_path_factory.mktemp("finetune")
    group = ProcGroup(work)
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--torch-threads", "1",
              "--throughput", "100"]
    try:
        a = group.start("A", ["node", "--blocks", "0:1", *common])
        group.wait_ready([a], timeout=90)
        peers = ["--initial-peers", a.info["dht_maddrs"][0]]
        rest = [group.start(n, ["node", "--blocks", b, *common, *peers]) for n, b in (("B", "1:3"), ("C", "3:4"))]
        group.wait_ready(rest, timeout=90)
        yield {"group": group, "maddr": a.info["dht_maddrs"][0], "work": work}
    except BaseException:
        print(group.dump_logs(), file=sys.stderr)
        raise
    finally:
        group.stop_all()


def test_swarm_lora_matches_local_and_exports_to_peft(swarm, tiny_model_dir, tiny_cache_dir, tiny_reference_model):
    from peft import PeftModel
    from safetensors.torch import load_file

    from pollinate.client.training_data import causal_lm_loss
    from test_training import peft_reference

    out = swarm["work"] / "adapter"
    steps, micro = 3, 2
    cmd = [sys.executable, str(CLIENT), "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
           "--initial-peers", swarm["maddr"], "--out", str(out), "--job", "sums", "--steps", str(steps),
           "--micro-batches", str(micro)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:] + swarm["group"].dump_logs()
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    history = result["history"]
    assert "NotFound" in result["unknown_job_error"] and "'no-such-job' is unknown" in result["unknown_job_error"]
    assert len(history) == steps

    # The same steps locally: PEFT on the whole model, the job's initial adapter, torch AdamW.
    sys.path.insert(0, str(CLIENT.parent))
    from finetune_client import token_batches

    from pollinate.node.adapters import AdapterHost
    from pollinate.protocol.shared import JobSpec
    from pollinate.node.training import make_job

    spec = JobSpec(rank=4, alpha=8.0, lr=1e-2, micro_batches=micro, grad_clip=0.0, seed=3)
    files_span = __import__("pollinate.node.model_files", fromlist=["open_model"]).open_model(
        tiny_model_dir, cache_dir=tiny_cache_dir, show_progress=False).load_span(0, 4)
    init = make_job("ref", spec, files_span, AdapterHost()).adapter.peft_state()
    model, named = peft_reference(tiny_reference_model, spec, init)
    opt = torch.optim.AdamW(list(named.values()), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    data = token_batches(steps * micro)
    losses = []
    for i in range(0, len(data), micro):
        step_losses = []
        for ids in data[i:i + micro]:
            loss = causal_lm_loss(model(ids).logits, ids)
            (loss / micro).backward()
            step_losses.append(float(loss))
        losses.append(sum(step_losses) / micro)
        opt.step()
        opt.zero_grad()

    swarm_state = load_file(str(out / "adapter_model.safetensors"))
    assert set(swarm_state) == set(named)
    moved = max(float((swarm_state[k] - init[k]).abs().max()) for k in named)
    diff = max(float((swarm_state[k] - named[k].detach()).abs().max()) for k in named)
    print(f"adapter moved by {moved:.3e}; swarm vs local max |diff| {diff:.3e}; "
          f"losses swarm {[round(h['loss'], 5) for h in history]} local {[round(x, 5) for x in losses]}")
    assert moved > 1e-3
    assert diff <= 1e-5
    assert [h["loss"] for h in history] == pytest.approx(losses, abs=1e-5)

    # The exported adapter through PEFT gives the swarm's logits with the job's adapter.
    logits = load_file(str(out / "swarm_logits.safetensors"))
    peft_model = PeftModel.from_pretrained(
        __import__("copy").deepcopy(tiny_reference_model), str(out)).eval()
    with torch.no_grad():
        local = peft_model(logits["probe"]).logits
    gap = float((local - logits["logits"]).abs().max())
    base_gap = float((local - logits["base_logits"]).abs().max())
    print(f"exported PEFT vs swarm-with-job logits max |diff| {gap:.3e} (vs base model {base_gap:.3e})")
    assert gap <= 1e-4
    assert base_gap > 1e-3  # the adapter changes the logits: the comparison is not vacuous

    # Greedy generation through the swarm with the job (Inference sessions, KV cache on the
    # nodes) equals the exported PEFT model's greedy generation.
    gen = load_file(str(out / "swarm_generate.safetensors"))
    with torch.no_grad():
        local_gen = peft_model.generate(gen["prompt"], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(local_gen, gen["generated"]), (local_gen, gen["generated"])


def test_swarm_methods_match_local_and_export(swarm, tiny_model_dir, tiny_cache_dir, tiny_reference_model):
    """IA3, LN tuning, full fine-tuning (on the nodes) and prompt tuning (on the trainer),
    one job each, through the same three nodes: the trained state equals the same steps
    run locally (PEFT, or plain torch for full) to 1e-5, and the export (PEFT adapter /
    full checkpoint, written from the settings the nodes report) gives the swarm's logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pollinate.client.training_data import causal_lm_loss
    from pollinate.node.adapters import AdapterHost
    from pollinate.node.model_files import open_model
    from pollinate.protocol.shared import JobSpec
    from pollinate.node.training import make_job
    from test_adapters import local_reference

    sys.path.insert(0, str(CLIENT.parent))
    from finetune_client import token_batches

    out = swarm["work"] / "methods"
    steps, micro, n_virtual = 3, 2, 4
    methods = ["ia3", "ln-tuning", "full", "prompt-tuning"]
    cmd = [sys.executable, str(CLIENT), "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir),
           "--initial-peers", swarm["maddr"], "--out", str(out), "--job", "m", "--steps", str(steps),
           "--micro-batches", str(micro), "--methods", ",".join(methods), "--num-virtual-tokens", str(n_virtual)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:] + swarm["group"].dump_logs()
    histories = json.loads(proc.stdout.strip().splitlines()[-1])["history"]

    # `pollinate export` needs nothing but the job's name: it writes what the client wrote.
    cli_out = swarm["work"] / "cli-export-ia3"
    r = subprocess.run([sys.executable, "-m", "pollinate", "export", "--job", "m-ia3", str(cli_out), "--model",
                        str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), "--initial-peers", swarm["maddr"]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((cli_out / "adapter_config.json").read_text()) == json.loads(
        (out / "ia3" / "adapter_config.json").read_text())
    cli_state, client_state = (load_file(str(d / "adapter_model.safetensors")) for d in (cli_out, out / "ia3"))
    assert set(cli_state) == set(client_state) and all(torch.equal(cli_state[k], client_state[k]) for k in cli_state)

    files = open_model(tiny_model_dir, cache_dir=tiny_cache_dir, show_progress=False)
    data = token_batches(steps * micro)
    for method in methods:
        spec = JobSpec(method=method, rank=4, alpha=8.0, lr=1e-2, micro_batches=micro, grad_clip=0.0, seed=3,
                       num_virtual_tokens=n_virtual if method == "prompt-tuning" else 0)
        if method == "prompt-tuning":  # PEFT's prompt tuning from the trainer's initial prompt
            from peft import PromptTuningConfig, get_peft_model

            from pollinate.client.prompt_tuning import SoftPrompt

            init = SoftPrompt(spec, files.load_client_part().embed_tokens).peft_state()
            model = get_peft_model(__import__("copy").deepcopy(tiny_reference_model),
                                   PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual))
            named = {"prompt_embeddings": model.prompt_encoder["default"].embedding.weight}
            with torch.no_grad():
                named["prompt_embeddings"].copy_(init["prompt_embeddings"])
            trim = n_virtual  # PEFT's logits include the virtual tokens; the trainer's loss does not
        else:
            init = make_job("ref", spec, files.load_span(0, 4), AdapterHost()).adapter.peft_state()
            model, named = local_reference(tiny_reference_model, spec, init)
            trim = 0
        opt = torch.optim.AdamW(list(named.values()), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
        losses = []
        for i in range(0, len(data), micro):
            step = [causal_lm_loss(model(ids).logits[:, trim:], ids) for ids in data[i:i + micro]]
            for loss in step:
                (loss / micro).backward()
            losses.append(sum(float(x) for x in step) / micro)
            opt.step()
            opt.zero_grad()

        if method == "full":
            exported = AutoModelForCausalLM.from_pretrained(out / method).eval()
            swarm_state = {k: v for k, v in exported.state_dict().items() if k in named}
        else:
            swarm_state = load_file(str(out / method / "adapter_model.safetensors"))
            exported = PeftModel.from_pretrained(__import__("copy").deepcopy(tiny_reference_model),
                                                 str(out / method)).eval()
        assert set(swarm_state) == set(named)
        moved = max(float((swarm_state[k] - init[k]).abs().max()) for k in named)
        diff = max(float((swarm_state[k] - named[k].detach()).abs().max()) for k in named)
        swarm_losses = [h["loss"] for h in histories[method]]
        logits = load_file(str(out / method / "swarm_logits.safetensors"))
        with torch.no_grad():
            local = exported(logits["probe"]).logits[:, trim:]
            base = tiny_reference_model(logits["probe"]).logits
        gap, base_gap = float((local - logits["logits"]).abs().max()), float((local - base).abs().max())
        print(f"{method}: moved {moved:.3e}, swarm vs local max |diff| {diff:.3e}, losses swarm "
              f"{[round(x, 5) for x in swarm_losses]} local {[round(x, 5) for x in losses]}; exported vs swarm "
              f"logits {gap:.3e} (vs base model {base_gap:.3e})")
        assert moved > 1e-3, method
        assert diff <= 1e-5, method
        assert swarm_losses == pytest.approx(losses, abs=1e-5), method
        assert gap <= 1e-4, method
        assert base_gap > 1e-3, method
        if method == "full":  # generating through the swarm with the job = the exported checkpoint's
            gen = load_file(str(out / method / "swarm_generate.safetensors"))
            with torch.no_grad():
                local_gen = exported.generate(gen["prompt"], max_new_tokens=8, min_new_tokens=8, do_sample=False)
            assert torch.equal(local_gen, gen["generated"]), (local_gen, gen["generated"])
        if method == "prompt-tuning":  # `pollinate generate --soft-prompt DIR`'s path: greedy decoding
            # of the exported PEFT model, recomputed over the whole sequence per token
            gen = load_file(str(out / method / "swarm_generate.safetensors"))
            seq = gen["prompt"]
            with torch.no_grad():
                while seq.shape[1] < gen["generated"].shape[1]:
                    seq = torch.cat([seq, exported(seq).logits[:, -1:].argmax(-1)], dim=1)
            assert torch.equal(seq, gen["generated"]), (seq, gen["generated"])


def test_bad_input_fails_before_training(tmp_path, tiny_model_dir, tiny_cache_dir):
    def train(data: Path, *extra) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pollinate", "train", "--job", "j", "--data", str(data),
                               "--model", str(tiny_model_dir), "--cache-dir", str(tiny_cache_dir), *extra],
                              capture_output=True, text=True, timeout=60)

    r = train(tmp_path / "missing.jsonl")
    assert r.returncode == 2 and "no such file" in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = train(empty)
    assert r.returncode == 2 and "no examples" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    r = train(bad)
    assert r.returncode == 2 and "bad.jsonl:2: not valid JSON" in r.stderr, r.stderr
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"text": "ok"}\n')
    r = train(ok, "--method", "bogus")
    assert r.returncode == 2 and "unknown adapter method 'bogus'; known: bottleneck, full, galore, ia3, " \
        "llama-adapter, ln-tuning, lora, prefix-tuning, prompt-tuning, reft\n" in r.stderr, r.stderr
    r = train(ok, "--method", "prompt-tuning")
    assert r.returncode == 2 and "needs --save DIR" in r.stderr, r.stderr
