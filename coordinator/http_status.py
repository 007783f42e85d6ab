"""A tiny read-only HTTP/1.1 server on asyncio streams for the status page.

    GET /                 HTML: the swarm (coverage, nodes, departures, jobs, last rounds)
    GET /jobs/NAME        HTML: a job (loss, bytes, members, tokens per round; its rounds)
    GET /nodes/ID         HTML: a node, live or gone
        ...?fragment=1    the page's <main> only: what its script fetches every 2 s
    GET /api/v1/status    JSON: the same snapshot `pollinate status` shows
    GET /api/v1/jobs/NAME JSON: a job and its committed rounds
    GET /metrics          Prometheus text format
    GET /healthz          "ok"
HEAD on any of them: the same status and headers, no body.

No framework: a few GET routes do not justify a dependency, and asyncio streams keep it on
the coordinator's event loop next to gRPC. Every read has a timeout and requests are capped
in size; each connection serves one request (Connection: close).
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from pollinate.coordinator.status import render_metrics
from pollinate.coordinator.status_page import job_fragment, job_json, node_fragment, overview_fragment, page

logger = logging.getLogger(__name__)

# A status request is one line plus a few headers; anything bigger is not for us.
MAX_REQUEST_BYTES = 16 * 1024
# Seconds a client gets to send its request; a stalled one must not hold a connection.
READ_TIMEOUT_S = 5.0
# Seconds to flush a response to a slow reader.
WRITE_TIMEOUT_S = 10.0
# Seconds a node's page waits for the node's Info RPC (its version and dtype) before it
# says the node did not answer; the page asks again on each refresh.
NODE_INFO_TIMEOUT_S = 2.0


async def ask_node_info(address: str, *, token: str | None, timeout_s: float = NODE_INFO_TIMEOUT_S) -> dict:
    """What a node says of itself through its Info RPC (version, dtype, model, measured
    throughput), or {"error": why} where it does not answer: for its status page."""
    from pollinate.protocol.channels import open_channel, peer_channel_config
    from pollinate.protocol.v1 import node_pb2, node_pb2_grpc

    channel = open_channel(address, peer_channel_config(token))
    try:
        reply = await node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(), timeout=timeout_s)
    except Exception as exc:  # grpc.aio.AioRpcError: unreachable, refused, timed out
        code = getattr(exc, "code", None)
        return {"error": code().name if callable(code) else type(exc).__name__}
    finally:
        await channel.close()
    return {"version": reply.version, "dtype": reply.dtype, "model_id": reply.model_id,
            "throughput": reply.throughput, "span": [reply.span.start, reply.span.end]}


class HttpStatusServer:
    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]],
                 history: Callable[[str], list[dict]] = lambda job: [],
                 node_info: Callable[[str], Awaitable[dict]] | None = None,
                 analysis: Callable[[str], list[dict]] = lambda job: []) -> None:
        """status: the snapshot (status.snapshot); history: a job's committed rounds, oldest
        first (Store.round_history); node_info: what a node at an address says of itself
        (ask_node_info), for its page; None: not asked; analysis: a job's stored
        `pollinate analyze` results by round (Store.analyses)."""
        self.host = host
        self.port = port
        self._status = status
        self._history = history
        self._analysis = analysis
        self._node_info = node_info
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
            headers: dict[str, str] = {}
            method, parts = "", []
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
                parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                return  # no whole request came: nothing to answer
            except asyncio.LimitOverrunError:  # a head over MAX_REQUEST_BYTES: say so, as HTTP does
                parts = None
            if parts is None:
                code, ctype, body = 431, "text/plain", b"request head too large\n"
            elif len(parts) != 3:
                code, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                method, target, _ = parts
                code, ctype, body, headers = await self._route(method, target)
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            writer.write(
                f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{extra}"
                f"Connection: close\r\n\r\n".encode("latin-1") + (b"" if method == "HEAD" else body)
            )
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        except Exception:
            logger.exception("HTTP status request failed")
        finally:
            writer.close()

    async def _route(self, method: str, target: str) -> tuple[int, str, bytes, dict[str, str]]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n", {"Allow": "GET, HEAD"}
        url = urlsplit(target)
        path = unquote(url.path)
        fragment = "fragment" in parse_qs(url.query, keep_blank_values=True)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n", {}
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", render_metrics(self._status()).encode(), {}
        status = self._status()
        stamp = {"X-Generated-At": repr(status["generated_at"])}
        if path == "/api/v1/status":
            return 200, "application/json", json.dumps(status, indent=1).encode(), stamp
        if path.startswith("/api/v1/jobs/"):
            name = path.removeprefix("/api/v1/jobs/")
            text = job_json(status, name, self._history(name), self._analysis(name))
            return (404, "text/plain", b"no such job\n", {}) if text is None else (200, "application/json", text.encode(), stamp)
        code = 200
        if path in ("/", "/index.html"):
            title, body = "Pollinate swarm", overview_fragment(status)
        elif path.startswith("/jobs/"):
            name = path.removeprefix("/jobs/")
            title, body = f"Job {name} · Pollinate", job_fragment(status, name, self._history(name), self._analysis(name))
            if body is None:  # a page that says so, and keeps looking: the job may come
                code, body = 404, f"<p>This coordinator knows no job {html.escape(name)}.</p>"
        elif path.startswith("/nodes/"):
            member_id = path.removeprefix("/nodes/")
            member = next((m for m in status["members"] if m["member_id"] == member_id), None)
            info = (await self._node_info(member["address"])
                    if member is not None and self._node_info is not None else None)
            title, body = f"Node {member_id} · Pollinate", node_fragment(status, member_id, info)
            if body is None:
                code, body = 404, (f"<p>This coordinator knows no node {html.escape(member_id)} "
                                   "(not a member, and not among the last departures).</p>")
        else:
            return 404, "text/plain", b"not found\n", {}
        text = body if fragment else page(title, body, status)
        return code, "text/html; charset=utf-8", text.encode(), stamp


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}
