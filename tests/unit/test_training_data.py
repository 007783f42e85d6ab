"""Training data: format errors with line numbers, too-long sequences, loss masks."""

from __future__ import annotations

import pytest

from pollinate.client.training_data import IGNORE, DataError, collate, load_examples, read_records


class CharTokenizer:
    """One token per character (ids = code points mod 256); no chat template."""

    chat_template = None
    eos_token = None

    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": [ord(c) % 256 for c in text]})()


def test_errors_name_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "hello"}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: expected a JSON object"):
        read_records(p)
    p.write_text('{"text": "hello"}\n{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: needs a string `text`"):
        read_records(p)
    p.write_text("")
    with pytest.raises(DataError, match="no examples"):
        read_records(p)
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")


def test_too_long_and_completion_mask(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "ab", "completion": "cd"}\n{"text": "' + "x" * 50 + '"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: 50 tokens, longer than the limit of 20"):
        load_examples(p, CharTokenizer(), max_length=20)
    (ex,) = load_examples(_one(p), CharTokenizer(), max_length=20)
    assert ex.input_ids == [97, 98, 99, 100] and ex.labels == [IGNORE, IGNORE, 99, 100]
    ids, labels = collate([ex, ex.__class__(input_ids=[5, 6], labels=[5, 6])], pad_id=0)
    assert ids[1].tolist() == [5, 6, 0, 0] and labels[1].tolist() == [5, 6, IGNORE, IGNORE]


def _one(p):
    q = p.with_name("one.jsonl")
    q.write_text(p.read_text().splitlines()[0] + "\n")
    return q
