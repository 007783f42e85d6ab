"""Training data for `pollinate train`: JSONL or plain text -> token ids and loss masks.

JSONL lines are objects with `text` (loss on every token) or `prompt` and `completion`
(rendered with the model's chat template as a user turn and the assistant's answer; loss
on the completion's tokens only). A file not ending in .jsonl is plain text, one example
per non-empty line. Every problem is reported with its line number before any training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100  # label of tokens that carry no loss (prompt, padding), as transformers uses


class DataError(ValueError):
    """The training data cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for each example of `path`; DataError on any bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    jsonl = path.suffix in (".jsonl", ".json")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            records.append((n, {"text": line}))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        has_text = isinstance(obj.get("text"), str)
        has_pair = isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str)
        if not (has_text or has_pair):
            raise DataError(f"{path}:{n}: needs a string `text`, or string `prompt` and `completion`")
        records.append((n, obj))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty)")
    return records


def tokenize(records: list[tuple[int, dict]], tokenizer, *, max_length: int, path: Path) -> list[Example]:
    """Token ids and labels; DataError naming the line of a sequence longer than max_length."""
    examples = []
    for n, rec in records:
        if "text" in rec and isinstance(rec["text"], str):
            ids = tokenizer(rec["text"]).input_ids
            labels = list(ids)
        else:
            chat = [{"role": "user", "content": rec["prompt"]}]
            if getattr(tokenizer, "chat_template", None):
                prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                eos = tokenizer.eos_token or ""
                completion = rec["completion"] + eos
            else:
                prompt, completion = rec["prompt"], rec["completion"]
            p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            c_ids = tokenizer(completion, add_special_tokens=False).input_ids
            ids = p_ids + c_ids
            labels = [IGNORE] * len(p_ids) + c_ids
        if len(ids) < 2:
            raise DataError(f"{path}:{n}: fewer than 2 tokens: nothing to predict")
        if len(ids) > max_length:
            raise DataError(f"{path}:{n}: {len(ids)} tokens, longer than the limit of {max_length}")
        examples.append(Example(input_ids=list(ids), labels=labels))
    return examples


def load_examples(path, tokenizer, *, max_length: int) -> list[Example]:
    return tokenize(read_records(Path(path)), tokenizer, max_length=max_length, path=Path(path))


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples (a seeded shuffle; the held-out part may be empty)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    k = int(round(len(examples) * eval_fraction))
    return [examples[i] for i in order[k:]], [examples[i] for i in order[:k]]


def batches(examples: list[Example], batch_size: int, seed: int):
    """Endless seeded batches: a fresh shuffle each epoch, so the order is reproducible."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels. Right padding needs no attention mask: with causal
    attention real tokens never see the pads after them, and pads carry no loss."""
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (transformers' convention)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
