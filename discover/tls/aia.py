"""Fetch a missing intermediate from an AIA CA Issuers URL: plain HTTP, a deadline, a size cap."""

from __future__ import annotations

import socket
import time
from contextlib import AbstractContextManager, nullcontext
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from depdrill.netns import Target, entered

MAX_BYTES = 64 * 1024  # a certificate or a small PKCS#7 bundle; anything bigger is refused


class AiaError(Exception):
    """The URL gave no certificate; the message says why."""


def parse_certificates(body: bytes) -> list[x509.Certificate]:
    """DER, PEM or PKCS#7 (DER or PEM), as CA Issuers URLs serve them in the wild."""
    loaders = (
        lambda b: [x509.load_der_x509_certificate(b)],
        x509.load_pem_x509_certificates,
        pkcs7.load_der_pkcs7_certificates,
        pkcs7.load_pem_pkcs7_certificates,
    )
    for load in loaders:
        try:
            certs = load(body)
        except Exception:  # each loader raises its own error type for foreign input
            continue
        if certs:
            return list(certs)
    raise AiaError("the response is not a certificate (DER, PEM or PKCS#7)")


def _get(url: str, deadline: float, target: Target | None) -> bytes:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise AiaError(f"not an http:// URL: {url[:200]!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise AiaError("no time left")
    namespace: AbstractContextManager[None] = entered(target) if target else nullcontext()
    with namespace:
        sock = socket.create_connection((parts.hostname, port), timeout=remaining)
    with sock:
        request = f"GET {path} HTTP/1.0\r\nHost: {parts.hostname}\r\nAccept: */*\r\n\r\n"
        sock.sendall(request.encode("ascii", "replace"))
        data = bytearray()
        while len(data) <= MAX_BYTES + 8192:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(16384)
            if not chunk:
                break
            data += chunk
        else:
            raise AiaError(f"response larger than {MAX_BYTES} bytes")
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or status[1] != b"200":
        raise AiaError(f"HTTP status {status[1:2]!r}" if len(status) > 1 else "no HTTP response")
    if len(body) > MAX_BYTES:
        raise AiaError(f"response larger than {MAX_BYTES} bytes")
    return body


def fetch_issuers(
    url: str, *, timeout_s: float, target: Target | None = None
) -> list[x509.Certificate]:
    """Certificates served at a CA Issuers URL; raises AiaError (never hangs past timeout_s)."""
    deadline = time.monotonic() + timeout_s
    try:
        body = _get(url, deadline, target)
    except OSError as exc:
        raise AiaError(f"{type(exc).__name__}: {exc}") from None
    return parse_certificates(body)
