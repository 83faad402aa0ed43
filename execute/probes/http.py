"""HTTP(S) probe: one GET from the host's namespace, a fresh connection every time."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from depdrill.execute.probes.base import Observation, describe_os_error
from depdrill.generate.model import HttpProbe as HttpProbeSpec

# Enough to find a health marker; a probe never reads an unbounded body.
MAX_BODY = 1 << 20


@dataclass(frozen=True)
class HttpProbe:
    spec: HttpProbeSpec
    tls: ssl.SSLContext | None = None  # for https URLs; None: the system trust store

    def run(self, deadline: float) -> Observation:
        start = time.monotonic()
        try:
            status, body = self._get(deadline)
        except TimeoutError:
            return Observation(False, None, f"timeout after {deadline - start:.1f} s")
        except ssl.SSLError as exc:
            return Observation(False, None, f"TLS: {exc.reason or exc.__class__.__name__}")
        except OSError as exc:
            return Observation(False, None, describe_os_error(exc))
        except http.client.HTTPException as exc:
            return Observation(False, None, f"bad HTTP response ({exc.__class__.__name__})")
        latency_ms = (time.monotonic() - start) * 1000
        if status != self.spec.expect_status:
            return Observation(False, latency_ms, f"HTTP {status}")
        needle = self.spec.body_contains
        if needle is not None and needle.encode() not in body:
            return Observation(False, latency_ms, "body does not contain the expected text")
        return Observation(True, latency_ms)

    def _get(self, deadline: float) -> tuple[int, bytes]:
        url = urlsplit(self.spec.url)
        host = url.hostname or ""
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            context = self.tls or ssl.create_default_context()
            conn = http.client.HTTPSConnection(
                host, url.port, timeout=_left(deadline), context=context
            )
        else:
            conn = http.client.HTTPConnection(host, url.port, timeout=_left(deadline))
        try:
            conn.request("GET", path, headers={"Connection": "close", "User-Agent": "depdrill"})
            _set_timeout(conn, deadline)
            response = conn.getresponse()
            body = b""
            while len(body) < MAX_BODY:
                _set_timeout(conn, deadline)
                chunk = response.read1(MAX_BODY - len(body))
                if not chunk:
                    break
                body += chunk
            return response.status, body
        finally:
            conn.close()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _set_timeout(conn: http.client.HTTPConnection, deadline: float) -> None:
    # socket timeouts are per call: shrink them so the whole GET ends by the deadline.
    sock: socket.socket | None = conn.sock
    if sock is not None:
        sock.settimeout(_left(deadline))
