"""Export formats for methods that no library installable beside transformers 5 loads, and
the loader that puts them on a plain transformers model.

- `bottleneck`: AdapterHub `adapters`' layout. adapters 1.3 requires transformers~=4.57,
  so it cannot load anything here; the directory keeps its names (`adapter_config.json`
  with AdapterHub's bottleneck fields, tensors named `model.layers.N.attention_adapters.
  adapters.NAME.adapter_down.0.weight` ...) in `adapter_model.safetensors`.
- `reft`: pyreft's LoReFT layout (pyreft 0.1 pins transformers 4.45): per block
  `model.layers.N.reft.rotate_layer` (Rᵀ, [d, r], orthonormal columns) and
  `...reft.learned_source.weight` / `.bias` (W [r, d], b [r]), with `adapter_config.json`
  naming the component (block_output), the positions (all) and the rank.

Both directories carry `"pollinate_method"` in adapter_config.json. `load_method_adapter(
model, dir)` reads either and hooks a `transformers` LlamaForCausalLM (forward hooks on the
modules the tensors name; nothing of the model is replaced), which is how the tests prove
the export reproduces the swarm's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pollinate.node.adapters.bottleneck import ADAPTER_NAME, PLACES, bottleneck
from pollinate.node.adapters.reft import loreft

FORMATS = {"bottleneck": "adapterhub-layout", "reft": "pyreft-layout"}  # method -> export_format name
STATE_FILE = "adapter_model.safetensors"


def method_config(spec, *, base_model: str, model_config) -> dict:
    """adapter_config.json for a bottleneck or reft job."""
    d = model_config.hidden_size
    if spec.method == "bottleneck":
        return {"pollinate_method": "bottleneck", "name": ADAPTER_NAME, "model_type": model_config.model_type,
                "model_name": base_model, "hidden_size": d,
                # AdapterHub's BnConfig fields: Houlsby = mh_adapter + output_adapter
                "config": {"architecture": "bottleneck", "mh_adapter": "o_proj" in spec.targets,
                           "output_adapter": "down_proj" in spec.targets, "reduction_factor": d / spec.rank,
                           "non_linearity": "relu", "residual_before_ln": True, "original_ln_before": False,
                           "original_ln_after": False, "init_weights": "pollinate: down Kaiming-uniform, up zeros"}}
    if spec.method == "reft":
        return {"pollinate_method": "reft", "model_type": model_config.model_type, "model_name": base_model,
                "intervention": "LoreftIntervention", "component": "block_output", "positions": "all",
                "low_rank_dimension": spec.rank, "embed_dim": d,
                "layers": list(range(model_config.num_hidden_layers))}
    raise ValueError(f"method {spec.method!r} has no pollinate export format")


def write_method_adapter(out_dir, state: dict[str, torch.Tensor], spec, *, base_model: str, model_config) -> Path:
    return write_adapter_dir(out_dir, method_config(spec, base_model=base_model, model_config=model_config), state)


def write_adapter_dir(out_dir, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """`adapter_config.json` and the tensors in `adapter_model.safetensors`: the directory
    layout PEFT, AdapterHub and this module's formats share."""
    from safetensors.torch import save_file

    if not state:
        raise ValueError("no adapter tensors to export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(out / STATE_FILE))
    return out


def load_method_adapter(model, path) -> list:
    """Hook the exported adapter in `path` onto `model` (a transformers LlamaForCausalLM);
    returns the hook handles (`handle.remove()` undoes it)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    state = load_file(str(path / STATE_FILE))
    method = config.get("pollinate_method")
    modules = dict(model.named_modules())
    handles = []
    if method == "bottleneck":
        target = {place: name for name, place in PLACES.items()}
        blocks = sorted({k.split(".")[2] for k in state}, key=int)
        for block in blocks:
            for place, linear in target.items():
                key = f"model.layers.{block}.{place}.adapters.{config['name']}"
                if f"{key}.adapter_up.weight" not in state:
                    continue
                tensors = [state[f"{key}.{p}"] for p in ("adapter_down.0.weight", "adapter_down.0.bias",
                                                          "adapter_up.weight", "adapter_up.bias")]
                sub = "self_attn" if linear == "o_proj" else "mlp"
                module = modules[f"model.layers.{block}.{sub}.{linear}"]
                handles.append(module.register_forward_hook(
                    lambda m, i, out, t=tensors: bottleneck(out, *t)))
    elif method == "reft":
        for block in sorted({k.split(".")[2] for k in state}, key=int):
            key = f"model.layers.{block}.reft"
            tensors = [state[f"{key}.rotate_layer"], state[f"{key}.learned_source.weight"],
                       state[f"{key}.learned_source.bias"]]
            handles.append(modules[f"model.layers.{block}"].register_forward_hook(
                lambda m, i, out, t=tensors: loreft(out, *t) if isinstance(out, torch.Tensor)
                else (loreft(out[0], *t), *out[1:])))
    else:
        raise ValueError(f"{path}: adapter_config.json names no pollinate method ({method!r})")
    if not handles:
        raise ValueError(f"{path}: no adapter tensors matched the model")
    return handles
