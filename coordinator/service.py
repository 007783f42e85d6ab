"""The Coordinator gRPC servicer: decode, call Membership, encode. Nothing else.

Domain errors (InvalidRequest, NotFound, ...) raised by Membership become status codes in
the error-mapping interceptor that RpcServer installs; the swarm token is checked by its
token interceptor before any method here runs, so a call with a wrong token records nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc.aio

from pollinate import __version__
from pollinate.coordinator.address_check import AddressCheck, holder_answers
from pollinate.coordinator.jobs import Jobs, spec_to_dict
from pollinate.coordinator.membership import JoinParams, Membership, parse_address
from pollinate.coordinator.quarantine import Quarantine
from pollinate.coordinator.retention import RetentionPolicy
from pollinate.coordinator.rounds import MAX_JOB_NAME, MAX_TRAINED_JOBS, Rounds, outer_from_proto
from pollinate.coordinator.status import job_to_dict
from pollinate.protocol.addresses import peer_host, probe_tcp
from pollinate.protocol.answers import MAX_EVIDENCE_BYTES, MAX_EVIDENCE_STEPS
from pollinate.protocol.channels import COORDINATOR_STATE_BYTES
from pollinate.protocol.data_tls import SwarmCA
from pollinate.protocol.errors import FailedPrecondition, InvalidRequest, NotFound, Unauthenticated, one_line
from pollinate.protocol.identity import CallSignatures, fingerprint
from pollinate.protocol.pieces import PIECE_BYTES, PieceBudget, state_replies
from pollinate.protocol.relay import dialer as relay_dialer
from pollinate.protocol.relay import is_relayed
from pollinate.protocol.shared import Span
from pollinate.protocol.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, node_pb2

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = "v1"
# Largest requests in pieces (protocol/pieces.py): a commit carries a state, or the base state
# and its shards' results (each at most a state); a report, its evidence and a step header each.
COMMIT_MAX_BYTES = 2 * COORDINATOR_STATE_BYTES + 64 * 1024
REPORT_MAX_BYTES = MAX_EVIDENCE_BYTES + MAX_EVIDENCE_STEPS * 1024
_METHOD = "/pollinate.v1.Coordinator/"  # + a method's name: what a member's call signature covers
_NO_INSTRUCTION = coordinator_pb2.Instruction(kind=coordinator_pb2.Instruction.NONE)


def span_from_proto(msg: common_pb2.Span, field: str) -> Span:
    try:
        return Span(msg.start, msg.end)
    except ValueError:
        raise InvalidRequest(f"{field} [{msg.start}, {msg.end}) is empty or reversed") from None


def optional_span(parent, field: str) -> Span | None:
    return span_from_proto(getattr(parent, field), field) if parent.HasField(field) else None


def span_to_proto(span: Span | None) -> common_pb2.Span | None:
    return None if span is None else common_pb2.Span(start=span.start, end=span.end)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        membership: Membership,
        *,
        dht_initial_peers: Callable[[], list[str]],
        status: Callable[[], dict],
        rounds: Rounds | None = None,
        jobs: Jobs | None = None,
        address_check: AddressCheck | None = None,
        quarantine: Quarantine | None = None,
        swarm_ca: SwarmCA | None = None,
        data_tls_cert_validity_s: float = 3600.0,
    ) -> None:
        self.membership = membership
        # requests in pieces held at once (protocol/pieces.py; each counts twice, its bytes and
        # the parsed message): the largest commit once per address, twice in all (~512 MiB);
        # this machine's addresses (a lab's nodes) only against the whole
        self.pieces = PieceBudget(total=4 * COMMIT_MAX_BYTES, per_host=2 * COMMIT_MAX_BYTES,
                                  is_local=address_check.is_local if address_check is not None else lambda host: False)
        self.quarantine = quarantine  # liar reports (coordinator/quarantine.py); None: not offered
        self.swarm_ca = swarm_ca  # --data-tls: the CA that certifies members (protocol/data_tls.py)
        self.data_tls_cert_validity_s = data_tls_cert_validity_s  # each node certificate's lifetime
        self.address_check = address_check  # None: announced addresses are not checked
        self.jobs = jobs or Jobs(membership.store, base_model=membership.config.model_id)
        self.rounds = rounds  # DiLoCo rounds (coordinator/rounds.py); None: not offered
        self._dht_initial_peers = dht_initial_peers
        self._status = status
        self.signatures = CallSignatures()  # calls in a member's name (protocol/identity.py)
        self.serving = True

    async def Health(self, request, context: grpc.aio.ServicerContext):
        status = (common_pb2.HealthReply.SERVING if self.serving
                  else common_pb2.HealthReply.NOT_SERVING)
        return common_pb2.HealthReply(status=status, version=__version__,
                                      protocol=PROTOCOL_VERSION)

    async def Join(self, request: coordinator_pb2.JoinRequest, context):
        source_host = peer_host(context.peer() or "")
        key = self._signed_by(context, "Join", request)
        if key is None:  # before anything else: an unsigned Join costs no dial and changes nothing
            raise Unauthenticated(
                "Join must be signed by the node's identity key: `pollinate node` signs it with its "
                "--identity-file key, a program signs with protocol/identity.py's NodeIdentity.call_metadata; "
                "the signature must be fresh (clocks within 300 s) and used once; see docs/security.md")
        if self.address_check is not None:
            await self.address_check.joining(request.address, peer_host=source_host)
        if self.quarantine is not None:
            self.quarantine.check(request.address, key)
        await self._check_takeover(request.address, key)
        params = JoinParams(
            address=request.address,
            model_id=request.model_id,
            capacity=request.capacity_blocks,
            throughput=request.throughput,
            requested_span=optional_span(request, "requested_span"),
            current_span=optional_span(request, "current_span"),
            name=one_line(request.name, 64),  # a label for logs and status: one line
            source_host=source_host,
            relay_maddr=request.relay_maddr,
            member_key=key,
            quant=request.quant or "none",  # empty: a node older than the field
        )
        member = self.membership.join(params)
        cfg = self.membership.config
        return coordinator_pb2.JoinReply(
            member_id=member.member_id,
            epoch=self.membership.epoch,
            span=span_to_proto(member.span),
            dht_initial_peers=self._dht_initial_peers(),
            heartbeat_period_s=cfg.heartbeat_period_s,
            lease_s=cfg.lease_s,
            model_id=cfg.model_id,
            num_blocks=cfg.num_blocks,
            data_tls_ca_pem=self._ca_pem(),
        )

    def _ca_pem(self) -> str:
        return self.swarm_ca.cert_pem if self.swarm_ca is not None else ""

    async def IssueDataTlsCertificate(self, request: coordinator_pb2.DataTlsCertificateRequest, context):
        if self.swarm_ca is None:
            raise FailedPrecondition("this swarm's data plane is plaintext (the coordinator runs without --data-tls)")
        key = self._signed_by(context, "IssueDataTlsCertificate", request)
        if key is None:
            raise Unauthenticated("IssueDataTlsCertificate must be signed by the member's key (protocol/identity.py)")
        member = self.membership.members.get(request.member_id)
        if member is None:  # it left, was evicted or quarantined: its certificate runs out unrenewed
            raise NotFound(f"no member {one_line(request.member_id, 80)}: join (again) first")
        self.membership.check_key(request.member_id, key)
        address = member.record.address
        if request.address and request.address != address:
            raise FailedPrecondition(f"member {member.member_id} holds {one_line(address, 200)}, not "
                                     f"{one_line(request.address, 200)}: join at that address first")
        if self.quarantine is not None:  # a quarantined address has left membership; this holds if not
            self.quarantine.check(address)
        chain = self.swarm_ca.issue(key, address, valid_s=self.data_tls_cert_validity_s)
        logger.info("certified member %s at %s (key %s) for %.0f s", member.member_id, one_line(address, 200),
                    fingerprint(key), self.data_tls_cert_validity_s)
        return coordinator_pb2.DataTlsCertificateReply(certificate_chain_pem=chain + self.swarm_ca.cert_pem,
                                                       ca_pem=self.swarm_ca.cert_pem,
                                                       valid_s=self.data_tls_cert_validity_s)

    async def _check_takeover(self, address: str, key: str) -> None:
        """A Join for an address a keyed member holds, with another key, passes only if that
        member no longer answers there (issue 18, item 5: no taking over a live node's place)."""
        held = self.membership.member_at(address)
        if held is None or not held.member_key or key == held.member_key:
            return
        if await holder_answers(address, held.member_key, self._dial_timeout_s()):
            raise FailedPrecondition(
                f"{one_line(address, 200)} is held by member {held.member_id}, which still serves there; "
                f"only the node at that address can join with it")

    def _dial_timeout_s(self) -> float:
        """How long the coordinator waits when it dials a member's address."""
        return self.address_check.config.dial_timeout_s if self.address_check else 3.0

    def _signed_by(self, context, method: str, request=None) -> str | None:
        """The public key that signed this call of `method` with `request` (None: a stream's
        call), or None (unsigned, or not validly)."""
        return self.signatures.verified_key(context.invocation_metadata(), _METHOD + method, request)

    def _member_key(self, member_id: str, context, method: str, request=None) -> None:
        self.membership.check_key(member_id, self._signed_by(context, method, request))

    async def Heartbeat(self, request: coordinator_pb2.HeartbeatRequest, context):
        self._member_key(request.member_id, context, "Heartbeat", request)
        return self._heartbeat(request)

    async def HeartbeatStream(self, request_iterator, context):
        # context.read/write rather than `async for ... yield`: one coroutine per stream and
        # no async-generator hop per message, which matters at thousands of beats a second.
        member_id = None
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            if member_id is None:  # the stream's one signature, checked with its first beat
                member_id = request.member_id
                self._member_key(member_id, context, "HeartbeatStream")
            elif request.member_id != member_id:
                raise InvalidRequest(f"this heartbeat stream belongs to member {member_id!r}, "
                                     f"not {request.member_id!r}; open a stream per member")
            await context.write(self._heartbeat(request))

    def _heartbeat(self, request: coordinator_pb2.HeartbeatRequest) -> coordinator_pb2.HeartbeatReply:
        trained = dict(request.trained_steps)
        if len(trained) > MAX_TRAINED_JOBS or any(len(job) > MAX_JOB_NAME for job in trained):
            raise InvalidRequest(f"trained_steps: at most {MAX_TRAINED_JOBS} jobs of at most {MAX_JOB_NAME} "
                                 f"characters, got {len(trained)}")
        result = self.membership.heartbeat(
            request.member_id, optional_span(request, "serving_span"), request.throughput,
            {f.name: getattr(request.load, f.name) for f in request.load.DESCRIPTOR.fields}
            if request.HasField("load") else None,
        )
        if self.rounds is not None:
            self.rounds.note_trained(request.member_id, trained)
        if result.move is None:
            instruction = _NO_INSTRUCTION
        else:
            instruction = coordinator_pb2.Instruction(
                kind=coordinator_pb2.Instruction.MOVE, span=span_to_proto(result.move),
                reason=result.reason,
            )
        return coordinator_pb2.HeartbeatReply(
            epoch=result.epoch, span=span_to_proto(result.span), instruction=instruction
        )

    async def Leave(self, request: coordinator_pb2.LeaveRequest, context):
        self._member_key(request.member_id, context, "Leave", request)
        return coordinator_pb2.LeaveReply(epoch=self.membership.leave(request.member_id))

    async def Status(self, request, context):
        reply = status_to_proto(self._status())
        reply.data_tls_ca_pem = self._ca_pem()
        return reply

    async def CheckReachable(self, request: coordinator_pb2.CheckReachableRequest, context):
        parse_address(request.address)  # InvalidRequest if it is neither host:port nor relayed
        if is_relayed(request.address):
            error = await relay_dialer().check(request.address)
        else:
            error = await asyncio.to_thread(probe_tcp, request.address, self._dial_timeout_s())
        return coordinator_pb2.CheckReachableReply(reachable=error is None, detail=error or "")

    def _quarantine(self) -> Quarantine:
        if self.quarantine is None:
            raise FailedPrecondition("this coordinator takes no liar reports")
        return self.quarantine

    async def ReportLiar(self, request: coordinator_pb2.ReportLiarRequest, context):
        """Judge the report's evidence (coordinator/evidence.py), then record it."""
        blocks = span_from_proto(request.blocks, "blocks")
        reporter = peer_host(context.peer() or "")
        quarantine = self._quarantine()
        verdict = await quarantine.judge_report(request.address, request.evidence if request.HasField("evidence")
                                                else None, reporter=reporter)
        if verdict.verdict == "verified":
            reason = f"blocks {blocks}: {verdict.detail}"
        else:
            checkers = ", ".join(one_line(c, 100) for c in request.checkers[:4])
            reason = (f"blocks {blocks}: distance {request.distance:.3g} > tolerance {request.tolerance:.3g} "
                      f"from the answers of {checkers or 'other replicas'} (the reporter's word; {verdict.detail})")
        now, reporters = quarantine.report(request.address, reporter, peer_id=request.peer_id, reason=reason,
                                           verified=verdict.verdict == "verified")
        return coordinator_pb2.ReportLiarReply(quarantined=now, reporters=reporters,
                                               needed=quarantine.config.reporters, verdict=verdict.verdict)

    async def ReportLiarInPieces(self, request_iterator, context):
        async with self.pieces.request(request_iterator, coordinator_pb2.ReportLiarRequest,
                                       host=peer_host(context.peer() or ""), max_bytes=REPORT_MAX_BYTES,
                                       what="ReportLiar") as request:
            return await self.ReportLiar(request, context)

    async def ListQuarantined(self, request, context):
        """The quarantined nodes, and the members' addresses that clients may route through
        (a DHT record at any other address was not announced by a member)."""
        nodes = self.quarantine.nodes() if self.quarantine is not None else {}
        members = sorted({m.record.address for m in self.membership.members.values()} - nodes.keys())
        return coordinator_pb2.ListQuarantinedReply(
            nodes=[quarantined_to_proto(q) for q in nodes.values()], member_addresses=members, lists_members=True)

    def _rounds(self) -> Rounds:
        if self.rounds is None:
            raise FailedPrecondition("this coordinator does not run DiLoCo rounds")
        return self.rounds

    async def BeginRound(self, request: coordinator_pb2.BeginRoundRequest, context):
        self._member_key(request.member_id, context, "BeginRound", request)
        group, shard = await self._rounds().begin(
            request.job, span_from_proto(request.span, "span"), request.round,
            request.member_id, request.tokens)
        return coordinator_pb2.BeginRoundReply(
            round=group.round, shard_index=shard, attempt=group.attempt,
            members=[coordinator_pb2.RoundMember(member_id=m, address=a) for m, a in group.members],
            send_state=group.state_member == request.member_id)

    async def CommitRound(self, request: coordinator_pb2.CommitRoundRequest, context):
        self._member_key(request.member_id, context, "CommitRound", request)
        span = span_from_proto(request.span, "span")
        o = request.outer
        outcome = await self._rounds().commit(
            request.job, span, request.round, request.member_id, request.checksum, request.state,
            request.attempt, bytes_sent=request.bytes_sent, bytes_received=request.bytes_received,
            coordinator_bytes_sent=request.coordinator_bytes_sent,
            coordinator_bytes_received=request.coordinator_bytes_received,
            results=[(r.shard_index, r.payload) for r in request.results],
            outer=outer_from_proto(o.codec, o.codec_params_json, o.lr, o.momentum, o.nesterov),
            base_state=request.base_state, request_bytes=request.ByteSize())
        reply = coordinator_pb2.CommitRoundReply(
            committed=outcome.committed, reason=outcome.reason, committed_round=outcome.committed_round,
            send_state=outcome.send_state)
        # the round's bytes include the commit's: the reply counts towards the member's received
        self._rounds().count_traffic(request.job, span, request.round, request.member_id,
                                     received=reply.ByteSize())
        return reply

    async def CommitRoundInPieces(self, request_iterator, context):
        async with self.pieces.request(request_iterator, coordinator_pb2.CommitRoundRequest,
                                       host=peer_host(context.peer() or ""), max_bytes=COMMIT_MAX_BYTES,
                                       what="CommitRound") as request:
            return await self.CommitRound(request, context)

    async def GetCommittedState(self, request: coordinator_pb2.GetCommittedStateRequest, context):
        rnd, checksum, path = self._rounds().committed_state_file(
            request.job, span_from_proto(request.span, "span"), request.round)
        size = path.stat().st_size
        if size > PIECE_BYTES:  # read whole per call, it would cost a state per concurrent caller
            raise FailedPrecondition(f"GetCommittedState: the state is {size} bytes, more than one message; "
                                     f"ask GetCommittedStateInPieces")
        return coordinator_pb2.GetCommittedStateReply(round=rnd, checksum=checksum, state=path.read_bytes())

    async def GetCommittedStateInPieces(self, request: coordinator_pb2.GetCommittedStateRequest, context):
        rnd, checksum, path = self._rounds().committed_state_file(
            request.job, span_from_proto(request.span, "span"), request.round)
        async for reply in state_replies(rnd, checksum, path):
            await context.write(reply)

    async def ReportTraining(self, request: coordinator_pb2.ReportTrainingRequest, context):
        files = [{"role": f.role, "name": one_line(f.name, 256), "size_bytes": f.size_bytes, "sha256": f.sha256,
                  "examples": f.examples} for f in request.data_files]
        round_index = self.jobs.report_training(
            request.job, request.trainer_id, data_files=files, step=request.step, tokens=request.tokens,
            train_loss=request.train_loss if request.HasField("train_loss") else None,
            heldout_loss=request.heldout_loss if request.HasField("heldout_loss") else None,
            version=request.version, git_commit=request.git_commit)
        return coordinator_pb2.ReportTrainingReply(round=round_index)

    async def GetJobHistory(self, request: coordinator_pb2.GetJobHistoryRequest, context):
        history = self.jobs.history(request.name)
        checkpoints = self.rounds.checkpoints if self.rounds is not None else None
        policy = (checkpoints.policies().get(request.name) if checkpoints is not None else None) or RetentionPolicy()
        return coordinator_pb2.JobHistory(
            job=job_to_proto(job_to_dict(history["job"])),
            rounds=[coordinator_pb2.CommittedRound(
                span=common_pb2.Span(start=r["span"][0], end=r["span"][1]), round=r["round"], checksum=r["checksum"],
                state_bytes=r["state_bytes"], committed_at=r["committed_at"], kept=r["kept"],
                pruned_at=r["pruned_at"], pruned_reason=r["pruned_reason"],
                members=[coordinator_pb2.RoundMemberTokens(**m) for m in r["members"]]) for r in history["rounds"]],
            losses=[coordinator_pb2.LossReport(**{k: v for k, v in loss.items() if v is not None})
                    for loss in history["losses"]],
            trainers=[coordinator_pb2.TrainerRecord(
                trainer_id=t["trainer_id"], version=t["version"], git_commit=t["git_commit"], joined_at=t["joined_at"],
                data_files=[coordinator_pb2.DataFile(**f) for f in t["data_files"]]) for t in history["trainers"]],
            keep_last=policy.keep_last, keep_log_spaced=policy.keep_log_spaced, keep_every=policy.keep_every,
            keep_max_bytes=policy.max_bytes, coordinator_version=__version__,
            coordinator_max_bytes=checkpoints.max_bytes if checkpoints is not None else 0,
            analysis=[coordinator_pb2.AnalysisRound(**a) for a in history["analysis"]])

    async def ReportAnalysis(self, request: coordinator_pb2.ReportAnalysisRequest, context):
        rows = [{"round": r.round, "train_loss": r.train_loss, "heldout_loss": r.heldout_loss,
                 "verbatim_train": r.verbatim_train, "verbatim_heldout": r.verbatim_heldout,
                 "train_examples": r.train_examples, "heldout_examples": r.heldout_examples} for r in request.rounds]
        stored = self.jobs.report_analysis(request.job, rows, data_sha256=request.data_sha256,
                                           heldout_sha256=request.heldout_sha256)
        return coordinator_pb2.ReportAnalysisReply(stored=stored)

    async def CreateJob(self, request: coordinator_pb2.CreateJobRequest, context):
        job, created = self.jobs.create(request.name, spec_to_dict(request.spec))
        return coordinator_pb2.CreateJobReply(job=job_to_proto(job_to_dict(job)), created=created)

    async def GetJob(self, request: coordinator_pb2.GetJobRequest, context):
        return job_to_proto(job_to_dict(self.jobs.get(request.name)))

    async def ListJobs(self, request, context):
        return coordinator_pb2.ListJobsReply(jobs=[job_to_proto(job_to_dict(j)) for j in self.jobs.list()])


def quarantined_to_proto(q: dict) -> coordinator_pb2.QuarantinedNode:
    return coordinator_pb2.QuarantinedNode(address=q["address"], peer_id=q["peer_id"], reporters=q["reporters"],
                                           since=q["since"], reason=q["reason"], verified=q["verified"])


def job_to_proto(job: dict) -> coordinator_pb2.JobInfo:
    return coordinator_pb2.JobInfo(
        name=job["name"], base_model=job["base_model"], spec=node_pb2.JobSpec(**job["spec"]),
        state=job["state"], created_at=job["created_at"], updated_at=job["updated_at"])


def _member_to_proto(m: dict) -> coordinator_pb2.MemberInfo:
    serving = m["serving_span"]
    return coordinator_pb2.MemberInfo(
        member_id=m["member_id"], address=m["address"], name=m["name"],
        span=common_pb2.Span(start=m["span"][0], end=m["span"][1]),
        serving_span=common_pb2.Span(start=serving[0], end=serving[1]) if serving else None,
        state=m["state"], throughput=m["throughput"], capacity_blocks=m["capacity_blocks"],
        pinned=m["pinned"], joined_at=m["joined_at"], last_heartbeat_at=m["last_heartbeat_at"],
        quant=m.get("quant", "none"), identity=m.get("identity", ""),
        load=common_pb2.ServingLoad(**m["load"]) if m.get("load") else None,
    )


def status_to_proto(status: dict) -> coordinator_pb2.StatusReply:
    return coordinator_pb2.StatusReply(
        epoch=status["epoch"], model_id=status["model_id"], num_blocks=status["num_blocks"],
        members=[_member_to_proto(m) for m in status["members"]],
        blocks=[coordinator_pb2.BlockCoverage(**b) for b in status["blocks"]],
        dht_initial_peers=status["dht_initial_peers"], started_at=status["started_at"],
        version=status["version"], heartbeat_period_s=status["heartbeat_period_s"],
        lease_s=status["lease_s"], relays=status.get("relays", []), jobs=[job_to_proto(j) for j in status.get("jobs", [])],
        rounds=[coordinator_pb2.RoundInfo(
            job=r["job"], span=common_pb2.Span(start=r["span"][0], end=r["span"][1]), round=r["round"],
            committed_at=r["committed_at"], members=[coordinator_pb2.RoundMemberTraffic(**m) for m in r["members"]])
            for r in status.get("rounds", [])],
        quarantined=[quarantined_to_proto(q) for q in status.get("quarantined", [])],
    )

