"""Servers that misbehave end in a `handshake-failed` finding within the timeout, never a hang."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from tls_zoo import Pki

from depdrill.discover.tls.check import check_endpoint

TIMEOUT_S = 0.8


@contextlib.contextmanager
def tcp_server(on_connect: Callable[[socket.socket], None] | None) -> Iterator[int]:
    """A loopback listener; on_connect(conn) per connection, or never accept at all (None)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                on_connect(conn)  # type: ignore[misc]

    thread = threading.Thread(target=serve, daemon=True)
    if on_connect is not None:
        thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        if on_connect is not None:
            thread.join()
        listener.close()


def silent(conn: socket.socket) -> None:
    # Read the ClientHello and say nothing, for longer than the client waits.
    conn.settimeout(TIMEOUT_S * 2)
    with contextlib.suppress(OSError):
        conn.recv(4096)
        time.sleep(TIMEOUT_S * 1.5)


def garbage(conn: socket.socket) -> None:
    conn.settimeout(1)
    with contextlib.suppress(OSError):
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + bytes(range(256)))


def reset(conn: socket.socket) -> None:
    conn.settimeout(1)
    with contextlib.suppress(OSError):
        conn.recv(4096)
    # SO_LINGER with a zero timeout turns close() into a RST.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def alert(conn: socket.socket) -> None:
    conn.settimeout(1)
    with contextlib.suppress(OSError):
        conn.recv(4096)
        conn.sendall(bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]))  # fatal handshake_failure


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        (None, "timed out during TLS handshake"),  # the kernel accepts; nobody ever reads
        (silent, "timed out during TLS handshake"),
        (garbage, "TLS error"),
        (reset, "connection error during the handshake"),
        (alert, "TLS error"),
    ],
    ids=["never-accepts", "silent", "garbage", "reset", "alert"],
)
def test_misbehaving_server_is_a_finding_within_the_timeout(
    pki: Pki, behaviour: Callable[[socket.socket], None] | None, reason: str
) -> None:
    # Given a server that misbehaves in one way
    with tcp_server(behaviour) as port:
        # When depdrill checks it with a short timeout
        started = time.monotonic()
        report = check_endpoint(
            "127.0.0.1", port, "x.zoo.test", ca_bundle=pki.bundle, timeout_s=TIMEOUT_S
        )
        elapsed = time.monotonic() - started
    # Then it reports handshake-failed with the reason, and returned within the timeout
    assert [f.code for f in report.findings] == ["handshake-failed"]
    assert reason in report.findings[0].message
    assert not report.handshake_ok and report.served == []
    assert elapsed < TIMEOUT_S + 1.0  # slack for a loaded 2-core machine; a hang is unbounded


def test_closed_port_is_a_finding(pki: Pki) -> None:
    # Given a port nobody listens on
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    report = check_endpoint("127.0.0.1", port, None, ca_bundle=pki.bundle, timeout_s=TIMEOUT_S)
    assert [f.code for f in report.findings] == ["handshake-failed"]
    assert "refused" in report.findings[0].message
