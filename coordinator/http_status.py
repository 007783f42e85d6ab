"""A tiny read-only HTTP/1.1 server on asyncio streams for the status page.

    GET /                 HTML: coverage bar per block, the node table
    GET /api/v1/status    JSON: the same snapshot `pollinate status` shows
    GET /metrics          Prometheus text format
    GET /healthz          "ok"

No framework: three GET routes do not justify a dependency, and asyncio streams keep it on
the coordinator's event loop next to gRPC. Every read has a timeout and requests are capped
in size; each connection serves one request (Connection: close).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

from pollinate.coordinator.status import render_html, render_metrics

logger = logging.getLogger(__name__)

# A status request is one line plus a few headers; anything bigger is not for us.
MAX_REQUEST_BYTES = 16 * 1024
# Seconds a client gets to send its request; a stalled one must not hold a connection.
READ_TIMEOUT_S = 5.0
# Seconds to flush a response to a slow reader.
WRITE_TIMEOUT_S = 10.0


class HttpStatusServer:
    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]]) -> None:
        self.host = host
        self.port = port
        self._status = status
        self._server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("HTTP status server has not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> str:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=MAX_REQUEST_BYTES
        )
        logger.info("status page on http://%s/", self.address)
        return self.address

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=2.0)
            except asyncio.TimeoutError:
                logger.warning("HTTP status connections still open after 2 s; leaving them")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) != 3:
                code, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                method, target, _ = parts
                code, ctype, body = self._route(method, target.split("?", 1)[0])
            writer.write(
                f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                f"Connection: close\r\n\r\n".encode("latin-1") + body
            )
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        except Exception:
            logger.exception("HTTP status request failed")
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/api/v1/status":
            return 200, "application/json", json.dumps(self._status(), indent=1).encode()
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", render_metrics(self._status()).encode()
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", render_html(self._status()).encode()
        return 404, "text/plain", b"not found\n"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
