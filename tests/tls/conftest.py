"""Fixtures of the TLS zoo: session-wide PKI, per-test TLS and AIA servers on loopback."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tls_zoo import AiaServer, Pki, Serve, TlsServer


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def serve(tmp_path: Path) -> Serve:
    return lambda chain, key: TlsServer(chain, key, tmp_path)


@pytest.fixture
def aia_server() -> Iterator[Callable[[bytes], str]]:
    """An HTTP server on loopback; publish(body) returns the URL that serves it."""
    bodies: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = bodies.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *_: object) -> None:
            pass

    server = AiaServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def publish(body: bytes) -> str:
        path = f"/issuer-{len(bodies)}.der"
        bodies[path] = body
        return f"http://127.0.0.1:{server.server_address[1]}{path}"

    yield publish
    server.shutdown()
    server.server_close()
    thread.join()
