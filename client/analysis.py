"""Memorisation analysis of a job's checkpoints (issue 15), run locally.

For each checkpoint (client/checkpoints.py: the job as it stood at round N), the base model
from the cache gets the adapter exported at that round (client/peft_export.py: the same
files `pollinate export --round N` writes, loaded by peft, or the full checkpoint), and
every example of the training and held-out sets is scored:

- loss: the mean next-token cross-entropy over its labelled tokens, as training computes
  it (client/training_data.py: a completion's tokens, or every token of a `text` example);
- verbatim: whether greedy decoding from its prompt reproduces its completion exactly.
  Greedy decoding follows the true completion iff at every completion position the most
  likely next token, given the true prefix, is the true token; so one teacher-forced
  forward pass decides it (no sampling loop), with the model's own logits. A `text`
  example's "prompt" is its first half (at least one token), as memorisation studies of
  Pythia prompt with a prefix and compare the continuation.

The set's mean loss on training vs held-out examples is the generalisation gap; the verbatim
rates on both say how much is recalled word for word beyond what the task itself makes
predictable. Per-example losses show which examples were learned first.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pollinate.client.training_data import IGNORE, Example, collate


@dataclass(frozen=True, kw_only=True)
class Scores:
    losses: list[float]  # per example, in the order given
    verbatim: list[bool]

    @property
    def mean_loss(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None

    @property
    def verbatim_rate(self) -> float | None:
        return sum(self.verbatim) / len(self.verbatim) if self.verbatim else None


def completion_labels(example: Example) -> list[int]:
    """The labels verbatim recall is judged on: the example's labelled tokens, or for a
    `text` example (every token labelled) its second half."""
    labels = list(example.labels)
    if labels and labels[0] != IGNORE:  # text: prompt with the first half
        half = max(1, len(labels) // 2)
        labels = [IGNORE] * half + labels[half:]
    return labels


@torch.no_grad()
def score(model, examples: list[Example], *, pad_id: int, batch_size: int = 8, progress=None) -> Scores:
    """Per-example loss and verbatim recall under `model` (a transformers causal LM)."""
    losses, verbatim = [], []
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        ids, labels = collate(batch, pad_id)
        _, judged = collate([Example(input_ids=e.input_ids, labels=completion_labels(e)) for e in batch], pad_id)
        logits = model(input_ids=ids).logits.float()
        target, judge = labels[:, 1:], judged[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp(min=0), reduction="none")
        mask = target != IGNORE
        losses += ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
        hit = (logits[:, :-1].argmax(-1) == judge) | (judge == IGNORE)
        verbatim += hit.all(1).tolist()
        if progress is not None:
            progress.update(len(batch))
    return Scores(losses=losses, verbatim=[bool(v) for v in verbatim])


def model_at(point, files, base, *, base_model: str, blocks: dict | None = None):
    """The base model (a transformers model, left untouched) with the checkpoint's adapter,
    loaded from the files `pollinate export --round N` writes (`blocks`: the loaded spans,
    kept across calls; client/checkpoints.py span_adapter)."""
    from pollinate.client.checkpoints import peft_state
    from pollinate.client.method_export import FORMATS
    from pollinate.client.peft_export import export_job

    method = point.spec.method
    if method in FORMATS:
        raise ValueError(f"method {method!r} exports in a layout no library loads (client/method_export.py); "
                         f"the analysis needs a PEFT adapter or a full checkpoint")
    with tempfile.TemporaryDirectory(prefix="pollinate-analyze-") as tmp:
        out = export_job(Path(tmp) / "export", point.spec, peft_state(point, files, blocks=blocks), files,
                         base_model=base_model)
        if method in ("full", "galore"):
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        from peft import PeftModel

        return PeftModel.from_pretrained(copy.deepcopy(base), out).eval()


def round_summary(round_index: int, point, train: Scores, heldout: Scores) -> dict:
    gap = (None if train.mean_loss is None or heldout.mean_loss is None
           else heldout.mean_loss - train.mean_loss)
    return {"round": round_index, "spans": [{"span": list(s.span), "round": s.round} for s in point.spans],
            "train_loss": train.mean_loss, "heldout_loss": heldout.mean_loss, "gap": gap,
            "verbatim_train": train.verbatim_rate, "verbatim_heldout": heldout.verbatim_rate,
            "train_examples": len(train.losses), "heldout_examples": len(heldout.losses),
            "train_losses": train.losses, "heldout_losses": heldout.losses,
            "train_verbatim": [i for i, v in enumerate(train.verbatim) if v],
            "heldout_verbatim": [i for i, v in enumerate(heldout.verbatim) if v]}


def first_learned(rows: list[dict], *, top: int = 5) -> list[tuple[int, int]]:
    """(training example index, the first analysed round it was reproduced verbatim at), the
    earliest first; examples never reproduced are left out."""
    first: dict[int, int] = {}
    for row in rows:
        for i in row["train_verbatim"]:
            first.setdefault(i, row["round"])
    return sorted(first.items(), key=lambda kv: (kv[1], kv[0]))[:top]


def report(job: str, rows: list[dict]) -> str:
    """A short human report of the analysed rounds."""
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"job {job}: {len(rows)} checkpoint(s) analysed",
             f"{'round':>6} {'train loss':>10} {'held-out':>9} {'gap':>7} {'verbatim train':>15} {'held-out':>9}"]
    for r in rows:
        lines.append(f"{r['round']:>6} {f(r['train_loss']):>10} {f(r['heldout_loss']):>9} {f(r['gap']):>7} "
                     f"{f(r['verbatim_train'], '{:.1%}'):>15} {f(r['verbatim_heldout'], '{:.1%}'):>9}")
    if len(rows) >= 2 and rows[0]["gap"] is not None and rows[-1]["gap"] is not None:
        grows = rows[-1]["gap"] > rows[0]["gap"]
        lines.append(f"generalisation gap {'grew' if grows else 'did not grow'}: {rows[0]['gap']:.3f} at round "
                     f"{rows[0]['round']} -> {rows[-1]['gap']:.3f} at round {rows[-1]['round']}")
    learned = first_learned(rows)
    if learned:
        lines.append("training examples reproduced verbatim first: " +
                     ", ".join(f"#{i} (round {r})" for i, r in learned))
    return "\n".join(lines)


def plot(job: str, rows: list[dict], out: Path) -> Path:
    """Loss (train, held-out) and verbatim rates against round, as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax_loss, ax_verb) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, style in (("train_loss", "training examples", "-"), ("heldout_loss", "held-out examples", "--")):
        ax_loss.plot(rounds, [r[key] for r in rows], style, marker="o", label=label)
    ax_loss.set(xlabel="round", ylabel="mean loss", title=f"{job}: loss per checkpoint")
    for key, label, style in (("verbatim_train", "training examples", "-"),
                              ("verbatim_heldout", "held-out examples", "--")):
        ax_verb.plot(rounds, [r[key] for r in rows], style, marker="o", label=label)
    ax_verb.set(xlabel="round", ylabel="share reproduced verbatim", title="verbatim recall (greedy)", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_verb):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
