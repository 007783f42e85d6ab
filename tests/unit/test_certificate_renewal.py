"""node/certificate_renewal.py: a node asks for its next data-TLS certificate at half the
current one's lifetime, retries a refusal soon (a tenth of the lifetime) and installs each
certificate it gets; a refusal is logged with how long the current one still lasts."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pollinate.node.certificate_renewal import CertificateRenewalConfig, keep_renewed
from pollinate.protocol.errors import NotFound


async def test_renews_at_half_its_lifetime_and_retries_a_refusal(caplog):
    loop = asyncio.get_running_loop()
    start = loop.time()
    asked: list[float] = []
    installed: list[tuple[float, bytes]] = []
    answers = [NotFound("no member m1: join (again) first"), ("chain-2", 0.6), ("chain-3", 0.6)]

    async def issue():
        asked.append(loop.time() - start)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def install(chain: bytes) -> None:
        installed.append((loop.time() - start, chain))

    caplog.set_level(logging.INFO, logger="pollinate.node.certificate_renewal")
    task = asyncio.create_task(keep_renewed(issue, install, valid_s=0.6, issued_at=start))
    try:
        async with asyncio.timeout(10):
            while len(installed) < 2:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert [chain for _, chain in installed] == [b"chain-2", b"chain-3"]
    assert asked[0] >= 0.3  # half of 0.6 s
    assert asked[1] - asked[0] >= 0.06  # the retry: a tenth of the lifetime later
    assert asked[2] - installed[0][0] >= 0.3  # half the new certificate's lifetime after it came
    refusal = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refusal) == 1 and "NotFound: no member m1" in refusal[0] and "expires in" in refusal[0], refusal


def test_config_is_checked():
    for bad in (dict(renew_at=0), dict(renew_at=1.0), dict(retry_max_s=0), dict(log_period_s=float("nan"))):
        with pytest.raises(ValueError):
            CertificateRenewalConfig(**bad)
