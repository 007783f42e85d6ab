"""Export a job: gather its state and settings from the spans, write files others load.

LoRA, IA3, LN tuning and prompt tuning become a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors) that `peft.PeftModel.from_pretrained`
loads onto the full Hugging Face model; `full` becomes a full checkpoint
(config.json + model.safetensors, `AutoModelForCausalLM.from_pretrained` loads it), and
so does `galore`; `bottleneck` and `reft` get the layouts of client/method_export.py.
The job's settings come from the nodes (GetState's first reply carries the spec), so
nothing has to be repeated on the command line.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import torch

from pollinate.protocol.errors import translate_rpc_errors
from pollinate.protocol.shared import JobSpec
from pollinate.protocol.tensors import TensorAssembler
from pollinate.protocol.v1 import common_pb2, node_pb2

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "ln-tuning": "LN_TUNING", "prompt-tuning": "PROMPT_TUNING",
              "prefix-tuning": "PREFIX_TUNING", "llama-adapter": "ADAPTION_PROMPT"}


async def gather_job(swarm, job: str, *, timeout_s: float = 60.0) -> tuple[JobSpec, dict[str, torch.Tensor]]:
    """The job's spec and its state from the spans of one route (counters left out).
    Every span must report the same spec; ValueError otherwise."""
    spec, state = None, {}
    for hop in await swarm.route(0, swarm.num_blocks):
        req = node_pb2.GetStateRequest(job=job, span=common_pb2.Span(start=hop.start, end=hop.end), round=0)
        assembler, hop_spec = TensorAssembler(), None
        with translate_rpc_errors(peer=hop.peer.address):
            call = swarm.stub(hop.peer.address).GetState(req, timeout=timeout_s)
            async for reply in call:
                if reply.HasField("spec"):
                    hop_spec = JobSpec.from_proto(reply.spec)
                enc = assembler.feed(reply.tensor)
                if enc is not None and not enc.name.startswith("counter."):
                    state[enc.name] = await asyncio.to_thread(enc.decode)
        if hop_spec is None:
            raise ValueError(f"node {hop.peer.address} sent no settings for job {job!r} (an older node?)")
        if spec is not None and hop_spec != spec:
            raise ValueError(f"job {job!r} has different settings on blocks {hop.start}:{hop.end} "
                             f"({hop_spec}) than on earlier blocks ({spec})")
        spec = hop_spec
    return spec, state


def peft_config(spec: JobSpec, *, base_model: str, model_config=None) -> dict:
    """adapter_config.json for `spec` (PEFT's field names; `model_config` for prompt tuning)."""
    if spec.method not in PEFT_TYPES:
        raise ValueError(f"adapter method {spec.method!r} has no PEFT format (full writes a checkpoint)")
    config = {"peft_type": PEFT_TYPES[spec.method], "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "inference_mode": True}
    if spec.method == "lora":
        config.update({"r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
                       "target_modules": sorted(spec.targets), "fan_in_fan_out": False, "use_rslora": False,
                       "use_dora": False, "init_lora_weights": True})
    elif spec.method == "ia3":
        config.update({"target_modules": sorted(spec.targets), "feedforward_modules": sorted(spec.feedforward),
                       "fan_in_fan_out": False, "init_ia3_weights": True})
    elif spec.method == "ln-tuning":
        config.update({"target_modules": sorted(spec.targets)})
    elif spec.method == "llama-adapter":  # JobSpec.rank is L, num_virtual_tokens the prompt length
        config.update({"adapter_len": spec.num_virtual_tokens, "adapter_layers": spec.rank,
                       "target_modules": "self_attn"})
    elif spec.method == "prefix-tuning":
        if model_config is None:
            raise ValueError("a prefix-tuning adapter needs the model's config (KV heads, layers)")
        heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
        token_dim = heads * (getattr(model_config, "head_dim", None)
                             or model_config.hidden_size // model_config.num_attention_heads)
        # what PEFT's _prepare_prompt_learning_config derives for Llama: KV heads, their width
        config.update({"num_virtual_tokens": spec.num_virtual_tokens, "token_dim": token_dim,
                       "num_transformer_submodules": 1, "num_attention_heads": heads,
                       "num_layers": model_config.num_hidden_layers, "encoder_hidden_size": token_dim,
                       "prefix_projection": False})
    else:
        if model_config is None:
            raise ValueError("a prompt-tuning adapter needs the model's config (hidden size, layers, heads)")
        config.update({"num_virtual_tokens": spec.num_virtual_tokens, "token_dim": model_config.hidden_size,
                       "num_transformer_submodules": 1, "num_attention_heads": model_config.num_attention_heads,
                       "num_layers": model_config.num_hidden_layers, "prompt_tuning_init": "RANDOM"})
    return config


def write_peft_adapter(out_dir, state: dict[str, torch.Tensor], spec: JobSpec, *, base_model: str,
                       model_config=None) -> Path:
    """`state`: PEFT-named tensors gathered from every span (or the trainer's soft prompt)."""
    from pollinate.client import method_export

    return method_export.write_adapter_dir(out_dir, peft_config(spec, base_model=base_model, model_config=model_config),
                                           state)


def write_full_checkpoint(out_dir, state: dict[str, torch.Tensor], files) -> Path:
    """The base model (`files`: node/model_files.ModelFiles) with every decoder block
    replaced by the job's trained weights; refuses a set that does not cover every block."""
    model = files.load_reference_model()
    blocks = {k for k in model.state_dict() if k.startswith("model.layers.")}
    if set(state) != blocks:
        missing, extra = sorted(blocks - set(state)), sorted(set(state) - blocks)
        raise ValueError(f"full checkpoint: gathered weights do not match the model's blocks "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(state, strict=False)
    out = Path(out_dir)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:  # as converted into the cache, so the directory is self-contained
        if (files.path / name).exists():
            shutil.copyfile(files.path / name, out / name)
    return out


def export_job(out_dir, spec: JobSpec, state: dict[str, torch.Tensor], files, *, base_model: str) -> Path:
    """Write the job in its method's format (see the module docstring)."""
    from pollinate.client import method_export

    if spec.method in ("full", "galore"):  # GaLore trains the full weights: a full checkpoint
        return write_full_checkpoint(out_dir, state, files)
    if spec.method in method_export.FORMATS:  # no installable library loads these (method_export.py)
        return method_export.write_method_adapter(out_dir, state, spec, base_model=base_model,
                                                  model_config=files.config)
    if spec.method == "prefix-tuning":  # the spans' per-block slices joined into PEFT's one tensor
        from pollinate.node.adapters.prefix import peft_prompt_embeddings

        state = peft_prompt_embeddings(state, files.num_blocks)
    return write_peft_adapter(out_dir, state, spec, base_model=base_model, model_config=files.config)
