"""Client-side prompt tuning (Lester et al. 2021), the method Petals' clients train: a soft
prompt of `spec.num_virtual_tokens` vectors, owned by the trainer, prepended to the input
embeddings. Nodes run their base spans (job ""), so they need no adapter and keep no state;
the first span's Backward returns the gradient of its input, whose first N positions are the
prompt's gradient. The trainer steps the prompt with its own AdamW under the nodes' step rule
(node/training.py optimizer_step: micro-batches averaged, clipped, NaN/Inf steps skipped).

The loss covers the input's own positions (logits of the virtual tokens are dropped), so it
is the same loss the other methods train on. The prompt is exported as PEFT's
PROMPT_TUNING adapter (`prompt_embeddings`), which `peft.PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import torch
from torch import nn

from pollinate.client.trainer import SwarmChain, Trainer, TrainConfig
from pollinate.node.training import Job, optimizer_step


class SoftPrompt(nn.Module):
    """[num_virtual_tokens, hidden] trainable vectors, initialised from the embeddings of
    tokens drawn from the vocabulary with `spec.seed` (PEFT's SAMPLE_VOCAB init)."""

    def __init__(self, spec, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(int(spec.seed))
        ids = torch.randint(0, embed_tokens.num_embeddings, (spec.num_virtual_tokens,), generator=gen)
        self.embedding = nn.Parameter(embed_tokens.weight.detach()[ids].float().clone())

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def prepend(self, hidden: torch.Tensor) -> torch.Tensor:
        prompt = self.embedding.detach().to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        return torch.cat([prompt, hidden], dim=1)

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.detach().float().cpu().clone()}


class PromptedPart:
    """The client part with the soft prompt in front: `embed` prepends it, `logits` drops
    the virtual tokens' positions, so the trainer's loss and logits see the input only."""

    def __init__(self, part, prompt: SoftPrompt) -> None:
        self.part, self.prompt = part, prompt
        self.dtype = part.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.prompt.prepend(self.part.embed(input_ids))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.part.logits(hidden_states[:, self.prompt.num_virtual_tokens:])


class BaseModelChain(SwarmChain):
    """The swarm's base model (job "" on every node); the first hop's input gradient trains the prompt."""

    def __init__(self, swarm, config: TrainConfig, *, timeout_s: float, job: Job) -> None:
        super().__init__(swarm, config, timeout_s=timeout_s)
        self.job, self.spec_msg = "", None
        self.prompt_job = job
        self._input_grad: torch.Tensor | None = None

    async def backward_hop(self, hop, hidden: torch.Tensor, grad: torch.Tensor, **kw) -> torch.Tensor:
        grad_in = await super().backward_hop(hop, hidden, grad, **kw)
        if hop.start == 0:  # the model's input: whichever replica took it (the trainer may fail over)
            self._input_grad = grad_in
        return grad_in

    async def backward(self, route, inputs, grad) -> None:
        self._input_grad = None
        await super().backward(route, inputs, grad)
        if self._input_grad is None:
            raise RuntimeError("Backward ended without the first blocks' input gradient")
        job, n = self.prompt_job, self.prompt_job.adapter.num_virtual_tokens
        grad = self._input_grad
        g = grad[:, :n].sum(0).to(torch.float32)  # the prompt is shared by the batch's rows
        prompt = job.adapter.embedding
        prompt.grad = g if prompt.grad is None else prompt.grad + g
        job.pending += 1
        job.tokens += grad.shape[0] * grad.shape[1]
        if job.pending >= job.spec.micro_batches:
            optimizer_step(job)


class PromptTuningTrainer(Trainer):
    """A Trainer whose trainable state is the soft prompt it owns (config.spec.method "prompt-tuning")."""

    def __init__(self, *, swarm, worker, client_part, pad_id: int, config: TrainConfig, timeout_s: float = 60.0):
        if config.spec.method != "prompt-tuning":
            raise ValueError(f"PromptTuningTrainer trains method 'prompt-tuning', not {config.spec.method!r}")
        super().__init__(swarm=swarm, worker=worker, client_part=client_part, pad_id=pad_id, config=config,
                         timeout_s=timeout_s)
        spec = config.spec
        prompt = SoftPrompt(spec, client_part.embed_tokens)
        optimizer = torch.optim.AdamW([prompt.embedding], lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
        self.prompt_job = Job(name=config.job, spec=spec, adapter=prompt, optimizer=optimizer)
        self.part = PromptedPart(client_part, prompt)
        self.chain = BaseModelChain(swarm, config, timeout_s=timeout_s, job=self.prompt_job)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The soft prompt under PEFT's name (`prompt_embeddings`)."""
        return self.prompt_job.adapter.peft_state()
