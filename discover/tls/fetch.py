"""Fetch a TLS endpoint's chain as served, in wire order, under one hard deadline.

pyOpenSSL, not the stdlib: `Connection.get_peer_cert_chain()` is public API (the stdlib
hands out the served chain only through the private `_sslobj.get_unverified_chain()` on
3.11), it can request and return the OCSP staple (the stdlib cannot, so must-staple and
stapled revocation could not be checked), and its non-blocking handshake (WantRead/Write)
lets one deadline cover connect and handshake together, so a server that accepts and
never answers cannot hold a worker past `timeout_s`. Verification is switched off here on
purpose: the chain is judged afterwards (`path`, `diagnose`, cryptography's verifier), and
security level 0 lets OpenSSL show a 1024-bit or SHA-1 chain instead of refusing it.
getaddrinfo cannot be interrupted, so a host name's lookup may overrun; addresses cannot.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import select
import socket
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from cryptography import x509
from OpenSSL import SSL

from depdrill.netns import Target, entered


class HandshakeFailed(Exception):
    """The endpoint did not complete a TLS handshake; the message says why, in one line."""


@dataclass
class Served:
    chain: list[x509.Certificate]
    protocol: str | None
    cipher: str | None
    ocsp_staple: bytes | None = None
    stapled: bool = False


@dataclass
class _Staple:
    response: bytes | None = None


def _on_staple(conn: SSL.Connection, response: bytes, _data: object) -> bool:
    staple = conn.get_app_data()
    if isinstance(staple, _Staple):
        staple.response = response or None
    return True  # judged later, never a reason to abort the handshake


@functools.cache
def _client_context() -> SSL.Context:
    """One context for every connection (OpenSSL shares it safely across threads)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE)
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    ctx.set_ocsp_client_callback(_on_staple)
    return ctx


def _wait(sock: socket.socket, *, write: bool, deadline: float, what: str) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise HandshakeFailed(f"timed out during {what}")
    poller = select.poll()
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    if not poller.poll(remaining * 1000):
        raise HandshakeFailed(f"timed out during {what}")


def _resolve(host: str, port: int, deadline: float) -> tuple[socket.AddressFamily, str]:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return (socket.AF_INET6 if address.version == 6 else socket.AF_INET), str(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise HandshakeFailed(f"cannot resolve {host!r}: {exc}") from None
    if time.monotonic() > deadline or not infos:
        raise HandshakeFailed(f"cannot resolve {host!r} in time")
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])


def _connect(sock: socket.socket, address: str, port: int, deadline: float) -> None:
    rc = sock.connect_ex((address, port))
    if rc not in (0, errno.EINPROGRESS):
        raise HandshakeFailed(f"connect failed: {os.strerror(rc)}")
    if rc == errno.EINPROGRESS:
        _wait(sock, write=True, deadline=deadline, what="TCP connect")
        rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            raise HandshakeFailed(f"connect failed: {os.strerror(rc)}")


def _handshake(conn: SSL.Connection, sock: socket.socket, deadline: float) -> None:
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            _wait(sock, write=False, deadline=deadline, what="TLS handshake")
        except SSL.WantWriteError:
            _wait(sock, write=True, deadline=deadline, what="TLS handshake")
        except SSL.ZeroReturnError:
            raise HandshakeFailed(
                "the server closed the TLS session during the handshake"
            ) from None
        except SSL.SysCallError as exc:
            code = exc.args[0] if exc.args else None
            if code == -1 or code == 0:
                raise HandshakeFailed(
                    "the server closed the connection during the handshake"
                ) from None
            if isinstance(code, int) and code > 0:
                raise HandshakeFailed(
                    f"connection error during the handshake: {os.strerror(code)}"
                ) from None
            raise HandshakeFailed(f"connection error during the handshake: {exc}") from None
        except SSL.Error as exc:
            raise HandshakeFailed(f"TLS error: {_openssl_reason(exc)}") from None


def _openssl_reason(exc: SSL.Error) -> str:
    """The innermost OpenSSL reason string, e.g. 'wrong version number'."""
    try:
        errors = exc.args[0]
        return "; ".join(str(e[2]) for e in errors) or str(exc)
    except (IndexError, TypeError):
        return str(exc) or type(exc).__name__


def fetch_chain(
    address: str,
    port: int,
    sni: str | None,
    *,
    timeout_s: float = 5.0,
    target: Target | None = None,
) -> Served:
    """Connect, handshake with SNI (and an OCSP status request), return the chain as sent.

    Raises HandshakeFailed for anything the endpoint does wrong; never waits past timeout_s.
    """
    deadline = time.monotonic() + timeout_s
    family, ip = _resolve(address, port, deadline)
    namespace: AbstractContextManager[None] = entered(target) if target else nullcontext()
    with namespace:
        # The socket belongs to the namespace it was created in, for its whole life.
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.setblocking(False)
        try:
            _connect(sock, ip, port, deadline)
        except OSError as exc:
            raise HandshakeFailed(f"connect failed: {exc.strerror or exc}") from None
        staple = _Staple()
        conn = SSL.Connection(_client_context(), sock)
        conn.set_app_data(staple)
        if sni:
            try:
                conn.set_tlsext_host_name(sni.encode("idna"))
            except (UnicodeError, ValueError):
                conn.set_tlsext_host_name(sni.encode("ascii", "replace"))
        conn.request_ocsp()
        conn.set_connect_state()
        _handshake(conn, sock, deadline)
        try:
            chain = conn.get_peer_cert_chain(as_cryptography=True) or []
            if not chain:
                leaf = conn.get_peer_certificate(as_cryptography=True)
                chain = [leaf] if leaf is not None else []
        except (ValueError, x509.InvalidVersion) as exc:  # DER OpenSSL took, cryptography not
            raise HandshakeFailed(
                f"the server sent a certificate that cannot be parsed: {exc}"
            ) from None
        protocol = conn.get_protocol_version_name() or None
        cipher = conn.get_cipher_name()
    if not chain:
        raise HandshakeFailed("the server sent no certificate")
    return Served(
        chain=list(chain),
        protocol=protocol,
        cipher=cipher,
        ocsp_staple=staple.response,
        stapled=staple.response is not None,
    )
