"""Write a job's adapter as a PEFT adapter directory (adapter_config.json + safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_peft_adapter(out_dir, state: dict[str, torch.Tensor], spec, *, base_model: str) -> Path:
    """`state`: PEFT-named tensors gathered from every span; refuses an incomplete set."""
    from safetensors.torch import save_file

    if spec.method != "lora":
        raise ValueError(f"export of adapter method {spec.method!r} is not supported (only lora)")
    if not state:
        raise ValueError("no adapter tensors to export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(spec.targets), "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(out / "adapter_model.safetensors"))
    return out
