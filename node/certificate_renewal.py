"""Keeping a node's data-TLS certificate fresh (`pollinate coordinator --data-tls`, issue 18).

The swarm CA issues short-lived certificates (an hour by default, the coordinator's
--data-tls-cert-validity) and revokes none: a node that left or was quarantined loses its
place on the data plane when its last certificate expires, because the coordinator issues a
certificate only to a current, unquarantined member at its own address. A running node
therefore asks again (the same signed IssueDataTlsCertificate) at about half of each
certificate's lifetime and swaps the new one into its running gRPC server
(RpcServer.replace_certificate: new handshakes get it, open connections and calls go on):

    renewal = asyncio.create_task(keep_renewed(issue, rpc.replace_certificate, valid_s=first_valid_s,
                                               config=CertificateRenewalConfig()))

A refused or failed renewal is retried (a coordinator restart, a re-join in progress); the
node keeps serving with the certificate it has until that one expires.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Awaitable, Callable

from pollinate.protocol.errors import PollinateError, RateLimitedLog, one_line

logger = logging.getLogger(__name__)

# issue(): a new certificate chain (PEM) and the seconds it is valid for, from the coordinator.
Issue = Callable[[], Awaitable[tuple[str, float]]]


@dataclass(frozen=True, kw_only=True)
class CertificateRenewalConfig:
    # Share of a certificate's lifetime after which the node asks for the next one. 0.5:
    # half, so a coordinator that is down for less than half the lifetime costs nothing.
    renew_at: float = 0.5
    # Pause between attempts while a renewal fails, seconds: at most this, and at most a tenth
    # of the certificate's lifetime (so a few-second test lifetime retries fast enough).
    # 10 s: a coordinator restart takes seconds; a refused node asks ~360 times an hour.
    retry_max_s: float = 10.0
    # Seconds between two log lines about failing renewals (the first is always logged).
    log_period_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.renew_at < 1:
            raise ValueError(f"renew_at must be in (0, 1), got {self.renew_at!r}")
        for name in ("retry_max_s", "log_period_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive, got {value!r}")


async def keep_renewed(issue: Issue, install: Callable[[bytes], None], *, valid_s: float,
                       issued_at: float | None = None,
                       config: CertificateRenewalConfig = CertificateRenewalConfig()) -> None:
    """Forever: wait `config.renew_at` of the current certificate's `valid_s` (counted from
    `issued_at`, the event loop's time when it was issued; None: now), ask `issue()` for the
    next one (retrying while it fails), `install` it. Cancel to stop."""
    loop = asyncio.get_running_loop()
    log = RateLimitedLog(config.log_period_s)
    issued_at = loop.time() if issued_at is None else issued_at
    while True:
        expires_at = issued_at + valid_s
        await asyncio.sleep(max(0.0, issued_at + valid_s * config.renew_at - loop.time()))
        while True:
            try:
                chain, new_valid_s = await issue()
                break
            except PollinateError as e:
                left = expires_at - loop.time()
                status = f"the current one expires in {left:.0f} s" if left > 0 else \
                    "the current one has expired: peers can no longer reach this node over TLS"
                log(logger.warning, "renew", "renewing the data-TLS certificate failed (%s: %s); %s; retrying",
                    type(e).__name__, one_line(str(e), 300), status)
                await asyncio.sleep(min(config.retry_max_s, valid_s / 10))
        install(chain.encode())
        issued_at, valid_s = loop.time(), new_valid_s
        logger.info("renewed the data-TLS certificate: valid for %.0f s", valid_s)
