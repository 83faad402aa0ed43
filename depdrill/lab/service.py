"""The lab's demo service: GET /health calls four dependencies, each handled differently.

Per request, names are resolved afresh through the system resolver (getaddrinfo), then:
payments over HTTPS with no timeout (critical: its failure answers 503), recommend over
HTTPS with a short deadline and a fallback, the cache (redis GET) with a short deadline
and a fallback, and a statsd datagram sent and forgotten. The ground truth in
depdrill.lab.truth describes how each behaves under faults; keep the two in step.

Run inside its namespace as `python -P -m depdrill.lab.service ...`. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import socketserver
import ssl
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A TCP+TLS1.3+HTTP exchange costs three round trips: with 100 ms added per packet from
# recommend that is ~300 ms, so 0.4 s mostly still answers; with 1000 ms the fallback
# kicks in at 0.4 s. Either way /health stays far under the lab's 800 ms p95 budget.
RECOMMEND_DEADLINE_S = 0.4
CACHE_DEADLINE_S = 0.2


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, _, port = text.rpartition(":")
        return cls(host, int(port))


class DeadlineExceeded(TimeoutError):
    pass


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline passed")
    return left


def resolve(endpoint: Endpoint, kind: socket.SocketKind) -> tuple[str, int]:
    """One fresh lookup through the system resolver (no cache in this process)."""
    infos = socket.getaddrinfo(endpoint.host, endpoint.port, socket.AF_INET, kind)
    address = infos[0][4]
    return str(address[0]), int(address[1])


def https_get(endpoint: Endpoint, path: str, context: ssl.SSLContext, within: float | None) -> Any:
    """GET a JSON document over a new TLS connection; `within` None waits forever."""
    address = resolve(endpoint, socket.SOCK_STREAM)
    deadline = None if within is None else time.monotonic() + within
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As http.client does: without it, Nagle holds the request behind the ACK of the TLS
    # Finished (a delayed ACK: +40 ms, and one more round trip under a latency fault).
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        raw.settimeout(_remaining(deadline))
        raw.connect(address)
        with context.wrap_socket(
            raw, server_hostname=endpoint.host, do_handshake_on_connect=False
        ) as tls:
            tls.settimeout(_remaining(deadline))
            tls.do_handshake()
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {endpoint.host}\r\n"
                "Connection: close\r\nAccept: application/json\r\n\r\n"
            )
            tls.settimeout(_remaining(deadline))
            tls.sendall(request.encode())
            tls.settimeout(_remaining(deadline))
            response = http.client.HTTPResponse(tls)
            try:
                response.begin()
                body = response.read()
            finally:
                response.close()
            if response.status != 200:
                raise ConnectionError(f"HTTP {response.status}")
            return json.loads(body)
    finally:
        raw.close()


def redis_get(endpoint: Endpoint, key: str, within: float) -> bytes | None:
    """GET one key with the redis protocol, written by hand; None when the key is unset."""
    address = resolve(endpoint, socket.SOCK_STREAM)
    deadline = time.monotonic() + within
    encoded = key.encode()
    command = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(encoded), encoded)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(_remaining(deadline))
        conn.connect(address)
        conn.settimeout(_remaining(deadline))
        conn.sendall(command)
        reply = b""
        while not _complete(reply):
            conn.settimeout(_remaining(deadline))
            chunk = conn.recv(4096)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            reply += chunk
    if reply.startswith(b"$-1"):
        return None
    if not reply.startswith(b"$"):
        raise ConnectionError(f"redis answered {reply[:40]!r}")
    header, _, rest = reply.partition(b"\r\n")
    return rest[: int(header[1:])]


def _complete(reply: bytes) -> bool:
    if b"\r\n" not in reply:
        return False
    header, _, rest = reply.partition(b"\r\n")
    if header.startswith(b"$") and header != b"$-1":
        return len(rest) >= int(header[1:]) + 2
    return True


def send_metric(endpoint: Endpoint, line: str) -> None:
    """Fire and forget: a statsd datagram; nothing waits for it and errors are ignored."""
    try:
        address = resolve(endpoint, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(line.encode(), address)
    except OSError:
        pass


@dataclass(frozen=True)
class Dependencies:
    payments: Endpoint
    recommend: Endpoint
    cache: Endpoint
    metrics: Endpoint
    tls: ssl.SSLContext


class HealthHandler(BaseHTTPRequestHandler):
    server: DemoServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/health":
            self._answer(404, {"error": "not found"})
            return
        started = time.monotonic()
        status, body = health(self.server.deps)
        body["elapsed_ms"] = round((time.monotonic() - started) * 1000, 1)
        self._answer(status, body)
        # After the answer: nothing the caller waits for depends on the metrics sink.
        send_metric(self.server.deps.metrics, f"lab.health.{status}:1|c")

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: probed several times a second."""


def health(deps: Dependencies) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {}
    try:
        # Deliberately no timeout: the lab's critical dependency without a deadline.
        body["payments"] = https_get(deps.payments, "/v1/status", deps.tls, within=None)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return 503, {"payments": f"unavailable: {type(exc).__name__}: {exc}"}
    try:
        body["recommend"] = https_get(
            deps.recommend, "/v1/recommendations", deps.tls, within=RECOMMEND_DEADLINE_S
        )
    except (OSError, ValueError, http.client.HTTPException) as exc:
        body["recommend"] = f"fallback ({type(exc).__name__})"
    try:
        cached = redis_get(deps.cache, "lab:greeting", within=CACHE_DEADLINE_S)
        body["cache"] = "miss" if cached is None else "hit"
    except (OSError, ValueError) as exc:
        body["cache"] = f"fallback ({type(exc).__name__})"
    return 200, body


class DemoServer(ThreadingHTTPServer):
    # Requests stuck on payments (no timeout) must not block the ones behind them.
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for this host's name (getfqdn): in a lab namespace
        # that can wait out a resolver that does not exist. The name is unused: skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def __init__(self, address: tuple[str, int], deps: Dependencies):
        super().__init__(address, HealthHandler)
        self.deps = deps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="depdrill.lab.service")
    parser.add_argument("--listen", required=True, help="ADDRESS:PORT")
    parser.add_argument("--ca-bundle", required=True, help="PEM of the CA the service trusts")
    parser.add_argument("--payments", required=True, help="NAME:PORT (HTTPS, critical)")
    parser.add_argument("--recommend", required=True, help="NAME:PORT (HTTPS, fallback)")
    parser.add_argument("--cache", required=True, help="NAME:PORT (redis, fallback)")
    parser.add_argument("--metrics", required=True, help="NAME:PORT (statsd over UDP)")
    args = parser.parse_args(argv)
    deps = Dependencies(
        payments=Endpoint.parse(args.payments),
        recommend=Endpoint.parse(args.recommend),
        cache=Endpoint.parse(args.cache),
        metrics=Endpoint.parse(args.metrics),
        tls=ssl.create_default_context(cafile=args.ca_bundle),
    )
    listen = Endpoint.parse(args.listen)
    server = DemoServer((listen.host, listen.port), deps)
    print(f"demo service listening on {listen.host}:{listen.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
