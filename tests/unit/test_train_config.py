"""TrainConfig's wire settings (issue 12): codecs per direction, checked before any call."""

from __future__ import annotations

import pytest

from pollinate.client.trainer import TrainConfig


def test_gradient_codec_defaults_to_the_wire_codec():
    assert TrainConfig(job="j", wire_codec="int8row").gradient_codec == "int8row"
    assert TrainConfig(job="j", wire_codec="int8row", grad_codec="int4row-sr").gradient_codec == "int4row-sr"
    assert TrainConfig(job="j").keep_inputs


@pytest.mark.parametrize("field", ["wire_codec", "grad_codec"])
def test_unknown_codec_is_refused_naming_the_field(field):
    with pytest.raises(ValueError, match=f"{field}: unknown codec 'int3row'"):
        TrainConfig(job="j", **{field: "int3row"})


def test_train_cli_offers_the_row_codecs(capsys):
    import argparse

    from pollinate.client.cli_train import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    text = p.format_help()
    for word in ("int8row", "int4row", "int4row-sr", "--grad-codec", "--no-keep-inputs"):
        assert word in text
    args = p.parse_args(["--job", "j", "--data", "d.jsonl", "--codec", "int4row", "--no-keep-inputs"])
    assert args.codec == "int4row" and args.grad_codec == "" and args.keep_inputs is False
