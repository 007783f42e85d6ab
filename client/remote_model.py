"""RemoteModelForCausalLM: the model's embeddings and LM head here, its blocks in the swarm.

    model = RemoteModelForCausalLM.from_pretrained("smollm2", initial_peers=[...], token=...)
    out = model.generate(input_ids, max_new_tokens=32)          # greedy or sampling
    with model.inference_session(max_length=512) as sess:        # chat: one session, many calls
        out = model.generate(ids, max_new_tokens=32); ...; model.generate(more_ids, ...)
    model = RemoteModelForCausalLM.from_pretrained("smollm2", ..., job="sums")  # a job's adapter
    with model.inference_session(max_length=512, job="sums"): ...  # or per session

With a job, every node applies that job's adapter (the job must exist on the nodes of the
route, i.e. have been trained there; otherwise NOT_FOUND).

Works with Hugging Face `generate()` (transformers 5.x) without its KV cache: the cache
lives on the nodes, so `prepare_inputs_for_generation` hands `forward` the whole sequence,
and `forward` sends only the tokens the open session has not processed yet (checking that
the prefix is the one it processed). Without an open session, `forward` runs the sequence
through a throwaway session. Padding (attention_mask zeros) is not supported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence

import torch
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from pollinate.client.config import ClientConfig
from pollinate.client.session import RemoteSession
from pollinate.client.swarm import Swarm
from pollinate.client.worker import LoopThread

logger = logging.getLogger(__name__)


class InferenceSession:
    """A synchronous handle on a RemoteSession, plus the token ids it has processed."""

    def __init__(self, model: RemoteModelForCausalLM, max_length: int, job: str = ""):
        self.model = model
        self.max_length = max_length
        self.job = job
        # a soft prompt (prompt tuning) goes in front of the session's first step and takes
        # cache slots on the nodes like the tokens it stands for
        self.soft_prompt = model.soft_prompt
        self.virtual = 0 if self.soft_prompt is None else self.soft_prompt.shape[0]
        self._remote = RemoteSession(model.swarm, max_length=max_length + self.virtual, job=job)
        self.token_ids: torch.Tensor | None = None  # [batch, position] ids already processed

    @property
    def position(self) -> int:
        """Tokens of the input processed (the soft prompt's positions not counted)."""
        return max(0, self._remote.position - self.virtual)

    @property
    def route(self):
        return self._remote.route

    @property
    def failovers(self) -> int:
        return self._remote.failovers

    @property
    def reroutes(self) -> int:
        return self._remote.reroutes

    @property
    def recovery_seconds(self) -> float:
        return self._remote.recovery_seconds

    @property
    def handoffs(self) -> int:
        """Hops resumed where a leaving node handed them (node/handoff.py), no replay."""
        return self._remote.handoffs

    @property
    def handoff_seconds(self) -> float:
        return self._remote.handoff_seconds

    def hop_seconds(self) -> list[tuple[str, float]]:
        return [(str(h.hop), h.step_seconds) for h in self._remote.hops]

    def new_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The part of `input_ids` this session has not processed; checks the rest matches."""
        pos = self.position
        if input_ids.shape[1] <= pos:
            raise ValueError(
                f"input has {input_ids.shape[1]} tokens but the session already processed {pos}; "
                f"pass the whole conversation, extended"
            )
        if self.token_ids is not None and not torch.equal(input_ids[:, :pos], self.token_ids):
            raise ValueError("input does not extend the tokens this session already processed")
        return input_ids[:, pos:]

    def step_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        timeout = self.model.client_config.step_timeout_s * (2 + self.model.client_config.max_failovers) * 4
        return self.model.worker.run(self._remote.step(hidden), timeout)

    def step_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, new, vocab] for the new tokens of `input_ids`."""
        new = self.new_tokens(input_ids)
        part = self.model.client_part
        with torch.inference_mode():
            hidden = part.embed(new)
            first = self.virtual and self._remote.position == 0
            if first:  # as PEFT's prompt tuning: the prompt's vectors before the input's embeddings
                prompt = self.soft_prompt.to(hidden.device, hidden.dtype).expand(hidden.shape[0], -1, -1)
                hidden = torch.cat([prompt, hidden], dim=1)
            out = self.step_hidden(hidden)
            if first:
                out = out[:, self.virtual:]
            logits = part.logits(out.to(part.dtype))
        self.token_ids = input_ids.clone()
        return logits

    def close(self) -> None:
        self.model.worker.run(self._remote.close(), 10.0)


class RemoteModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LlamaConfig
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config, *, client_part, swarm: Swarm, worker: LoopThread, client_config: ClientConfig, dht=None,
                 job: str = ""):
        super().__init__(config)
        self.job = job  # default job for sessions ("" = the base model)
        self.client_part = client_part
        self.swarm = swarm
        self.worker = worker
        self.client_config = client_config
        self.dht = dht
        self._session: InferenceSession | None = None
        # a trained soft prompt [virtual tokens, hidden] (`pollinate train --method prompt-tuning
        # --save DIR`; load_soft_prompt): every session starts with it
        self.soft_prompt: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str = "smollm2",
        *,
        initial_peers: Sequence[str] = (),
        coordinator: str | None = None,
        token: str | None = None,
        coordinator_tls: str | None = None,
        swarm_ca=None,
        dht=None,
        cache_dir=None,
        config: ClientConfig | None = None,
        job: str | None = None,
        exact: bool = False,
        **overrides,
    ) -> RemoteModelForCausalLM:
        """Load the client part of `model` and connect to its swarm.

        Starts a client-mode hivemind DHT peer (a forked process) unless `dht` is given: call
        this before creating any gRPC object in the process. `coordinator_tls`: None for a
        plaintext coordinator, "" for TLS trusting the system's roots, or the path of the PEM
        certificate to trust (the CLI's --coordinator-tls). `exact`: route only through nodes
        whose weights are unquantised (RoutingConfig.exact; the CLI's --exact). `swarm_ca`: the
        path of a --data-tls swarm's CA certificate (the CLI's --swarm-ca), for a client that
        bootstraps from `initial_peers` alone: nodes are then verified against it."""
        from pollinate.node.announce import start_dht
        from pollinate.node.model_files import open_model

        client_config = config or ClientConfig(token=token, **overrides)
        if coordinator is not None and not client_config.coordinator:  # liar reports, quarantine
            client_config = dataclasses.replace(client_config, coordinator=coordinator,
                                                coordinator_tls=coordinator_tls)
        if exact:
            client_config = dataclasses.replace(
                client_config, routing=dataclasses.replace(client_config.routing, exact=True))
        if dht is None:
            dht = start_dht(bootstrap_peers(initial_peers, coordinator, token, coordinator_tls, swarm_ca),
                            client_mode=True)
        elif swarm_ca is not None:
            pin_swarm_ca(swarm_ca, None)
        if not client_config.coordinator and swarm_ca is not None:
            logger.info("no coordinator given: routing through every DHT record; nodes are verified against the "
                        "swarm CA in %s, so a record at a non-member's address fails the TLS handshake and gets no "
                        "call", swarm_ca)
        elif not client_config.coordinator and client_config.token:  # docs/security.md: records are tagged
            logger.warning("no coordinator given: routing through every DHT record tagged with the swarm token, "
                           "members of the swarm or not (any token holder can announce blocks and receive this "
                           "client's calls); give coordinator=HOST:PORT (--coordinator) to route through members only")
        elif not client_config.coordinator:  # an open swarm: DHT records need no token
            logger.warning("no coordinator given: routing through every DHT record, members of the swarm or not "
                           "(a stranger that reaches the DHT can announce blocks and receive this client's calls); "
                           "give coordinator=HOST:PORT (--coordinator) to route through members only")
        files = open_model(model, cache_dir=cache_dir, show_progress=False)
        part = files.load_client_part()
        worker = LoopThread()
        swarm = Swarm(dht=dht, model_id=model, num_blocks=files.num_blocks,
                      config=client_config)
        self = cls(files.config, client_part=part, swarm=swarm, worker=worker, client_config=client_config, dht=dht,
                   job=job or "")
        self.generation_config = files.generation_config()
        self.generation_config.use_cache = False  # the KV cache lives on the nodes
        self.model_files = files
        return self.eval()

    def load_soft_prompt(self, path) -> None:
        """Use the PEFT PROMPT_TUNING adapter in directory `path` (what `train --save` writes
        for prompt tuning) in every session from now on."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        config = json.loads((Path(path) / "adapter_config.json").read_text())
        if config.get("peft_type") != "PROMPT_TUNING":
            raise ValueError(f"{path}: not a prompt-tuning adapter (peft_type {config.get('peft_type')!r})")
        prompt = load_file(str(Path(path) / "adapter_model.safetensors"))["prompt_embeddings"]
        if prompt.dim() != 2 or prompt.shape[1] != self.config.hidden_size:
            raise ValueError(f"{path}: prompt_embeddings of shape {list(prompt.shape)}, expected "
                             f"[virtual tokens, {self.config.hidden_size}]")
        self.soft_prompt = prompt

    def get_input_embeddings(self):
        return self.client_part.embed_tokens

    def get_output_embeddings(self):
        return self.client_part.lm_head

    # ---- sessions

    @contextlib.contextmanager
    def inference_session(self, max_length: int, job: str | None = None) -> Iterator[InferenceSession]:
        """A session on the nodes; `job` (default: the model's) applies that job's adapter."""
        if self._session is not None:
            raise RuntimeError("an inference session is already open on this model")
        session = InferenceSession(self, max_length, self.job if job is None else job)
        self._session = session
        try:
            yield session
        finally:
            self._session = None
            session.close()

    @property
    def active_session(self) -> InferenceSession | None:
        return self._session

    # ---- generate() integration

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def generate(self, inputs=None, *args, **kwargs):
        if self._session is not None:
            return super().generate(inputs, *args, **kwargs)
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        n = ids.shape[1] if ids is not None else 1
        max_new = kwargs.get("max_new_tokens") or self.generation_config.max_new_tokens
        max_length = n + max_new if max_new else (kwargs.get("max_length") or self.generation_config.max_length)
        with self.inference_session(max_length=max_length):
            return super().generate(inputs, *args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, return_dict=True, **kwargs):
        if input_ids is None:
            raise ValueError("RemoteModelForCausalLM.forward needs input_ids")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding (attention_mask zeros) is not supported by the remote model")
        if self._session is not None:
            logits = self._session.step_tokens(input_ids)
        else:
            with self.inference_session(max_length=input_ids.shape[1]) as s:
                logits = s.step_tokens(input_ids)
        return CausalLMOutputWithPast(logits=logits)

    def shutdown(self) -> None:
        """Close channels, the loop thread and the DHT peer this model started."""
        try:
            self.worker.run(self.swarm.close(), 5.0)
        finally:
            self.worker.stop()
            if self.dht is not None:
                self.dht.shutdown()


def bootstrap_peers(initial_peers: Sequence[str], coordinator: str | None, token: str | None,
                    coordinator_tls: str | None = None, swarm_ca=None) -> list[str]:
    """DHT multiaddrs to bootstrap from: `initial_peers` and, with `coordinator`, its own
    (_coordinator_peers, which also takes a --data-tls swarm's CA from its answer); with
    `swarm_ca`, nodes are verified against that CA (pin_swarm_ca)."""
    peers = list(initial_peers)
    if coordinator is not None:
        peers += _coordinator_peers(coordinator, token, coordinator_tls)
    if not peers:
        raise ValueError("give initial_peers (DHT multiaddrs) or coordinator=HOST:PORT")
    if swarm_ca is not None:
        pin_swarm_ca(swarm_ca, coordinator)
    return peers


def _coordinator_peers(address: str, token: str | None, tls: str | None = None) -> list[str]:
    """The coordinator's DHT bootstrap multiaddrs, asked from a subprocess: this process
    starts a DHT (it forks) right after, so it must not hold gRPC objects yet
    (coordinator/probe.py). Routing then comes from the DHT alone: generation keeps working
    while the coordinator is down. A --data-tls swarm's CA is taken from the same answer."""
    from pollinate.coordinator.probe import probe_coordinator
    from pollinate.protocol.channels import coordinator_tls

    if not token:
        raise ValueError("coordinator= needs the swarm token (token=...)")
    from pollinate.protocol.data_tls import use_swarm_ca

    info = probe_coordinator(address, token, **coordinator_tls(tls))
    use_swarm_ca(info.data_tls_ca_pem)  # a --data-tls swarm: nodes are dialled over TLS, verified
    peers = list(info.dht_initial_peers)
    if not peers:
        raise ValueError(f"coordinator {address} runs no bootstrap DHT peer; pass initial_peers")
    return peers


def pin_swarm_ca(path, coordinator: str | None) -> None:
    """Dial nodes over TLS verified against the swarm CA certificate in `path` (--swarm-ca):
    what a client that bootstraps from --initial-peers alone cannot ask a coordinator for.
    Where `coordinator` was just asked (_coordinator_peers), its CA must be this one."""
    from cryptography import x509

    from pollinate.protocol.data_tls import read_swarm_ca, swarm_ca_pem, use_swarm_ca

    pem = read_swarm_ca(path)
    said = swarm_ca_pem()
    if coordinator and said is None:
        raise ValueError(f"coordinator {coordinator} runs a plaintext data plane (no --data-tls): drop --swarm-ca")
    if said is not None and x509.load_pem_x509_certificate(said) != x509.load_pem_x509_certificate(pem):
        raise ValueError(f"the swarm CA in {path} is not coordinator {coordinator}'s: copy its DATA_DIR/swarm-ca.pem")
    use_swarm_ca(pem)
