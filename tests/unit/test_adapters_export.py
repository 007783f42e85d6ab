"""Export formats (client/peft_export.py): refusals that must come before anything is written."""

from __future__ import annotations

import pytest

from pollinate.client.peft_export import export_job, peft_config, write_peft_adapter
from pollinate.node.adapters import AdapterHost
from pollinate.node.training import make_job
from pollinate.protocol.shared import JobSpec


def test_full_checkpoint_needs_every_block(tmp_path, tiny_model_files):
    spec = JobSpec(method="full")
    state = make_job("j", spec, tiny_model_files.load_span(0, 3), AdapterHost()).adapter.peft_state()  # 3 of 4 blocks
    with pytest.raises(ValueError, match=r"missing \['model.layers.3"):
        export_job(tmp_path / "out", spec, state, tiny_model_files, base_model="tiny")
    assert not (tmp_path / "out").exists()


def test_peft_formats_refuse_what_they_cannot_describe(tmp_path, tiny_model_files):
    with pytest.raises(ValueError, match="no PEFT format"):
        peft_config(JobSpec(method="full"), base_model="tiny")
    with pytest.raises(ValueError, match="needs the model's config"):
        peft_config(JobSpec(method="prompt-tuning", num_virtual_tokens=2), base_model="tiny")
    with pytest.raises(ValueError, match="no adapter tensors"):
        write_peft_adapter(tmp_path / "out", {}, JobSpec(method="ia3"), base_model="tiny")
    assert not (tmp_path / "out").exists()
    config = peft_config(JobSpec(method="prompt-tuning", num_virtual_tokens=2), base_model="tiny",
                         model_config=tiny_model_files.config)
    assert (config["peft_type"], config["token_dim"], config["num_layers"]) == ("PROMPT_TUNING", 64, 4)
