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
from collections.abc import Generator, Iterator, Sequence
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


@dataclass(frozen=True)
class _Want:
    """What a session waits for next: its socket readable (or writable), during `what`."""

    sock: socket.socket
    write: bool
    what: str


# A session is a generator: it yields what it waits for and returns the chain as served.
# One endpoint drives it with poll() (fetch_chain); a walk drives hundreds of them from one
# thread (fetch_chains), so no thread waits on a socket and no GIL changes hands per step.
_Session = Generator[_Want, None, Served]


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


def _connect(sock: socket.socket, address: str, port: int) -> Generator[_Want, None, None]:
    rc = sock.connect_ex((address, port))
    if rc not in (0, errno.EINPROGRESS):
        raise HandshakeFailed(f"connect failed: {os.strerror(rc)}")
    if rc == errno.EINPROGRESS:
        yield _Want(sock, write=True, what="TCP connect")
        rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            raise HandshakeFailed(f"connect failed: {os.strerror(rc)}")


def _handshake(conn: SSL.Connection, sock: socket.socket) -> Generator[_Want, None, None]:
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            yield _Want(sock, write=False, what="TLS handshake")
        except SSL.WantWriteError:
            yield _Want(sock, write=True, what="TLS handshake")
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


def _session(
    address: str, port: int, sni: str | None, deadline: float, target: Target | None
) -> _Session:
    """Connect, handshake with SNI (and an OCSP status request), return the chain as sent."""
    family, ip = _resolve(address, port, deadline)
    namespace: AbstractContextManager[None] = entered(target) if target else nullcontext()
    with namespace:
        # The socket belongs to the namespace it was created in, for its whole life.
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.setblocking(False)
        try:
            yield from _connect(sock, ip, port)
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
        yield from _handshake(conn, sock)
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


def fetch_chain(
    address: str,
    port: int,
    sni: str | None,
    *,
    timeout_s: float = 5.0,
    target: Target | None = None,
) -> Served:
    """The chain one endpoint sends, in wire order.

    Raises HandshakeFailed for anything the endpoint does wrong; never waits past timeout_s.
    """
    deadline = time.monotonic() + timeout_s
    session = _session(address, port, sni, deadline, target)
    try:
        want = next(session)
        while True:
            remaining = deadline - time.monotonic()
            poller = select.poll()
            poller.register(want.sock, select.POLLOUT if want.write else select.POLLIN)
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise HandshakeFailed(f"timed out during {want.what}")
            want = session.send(None)
    except StopIteration as done:
        served: Served = done.value
        return served
    finally:
        session.close()  # a session given up on closes its socket


Endpoint = tuple[str, int, str | None]  # address, port, SNI


def fetch_chains(
    endpoints: Sequence[Endpoint],
    *,
    timeout_s: float = 5.0,
    target: Target | None = None,
    in_flight: int = 256,
) -> Generator[tuple[int, Served | HandshakeFailed], None, None]:
    """The chains many endpoints send, fetched at once from this thread: (index, chain or
    why not), in the order they finish. At most `in_flight` sockets are open at a time;
    each endpoint has its own `timeout_s` from when its connect starts. Addresses are best:
    a host name's lookup blocks the walk while it runs."""
    poller = select.poll()
    active: dict[int, tuple[int, _Session, _Want, float]] = {}  # fd -> index, session...
    pending = iter(enumerate(endpoints))

    def advance(index: int, session: _Session, deadline: float) -> HandshakeFailed | Served | None:
        try:
            want = next(session)
        except StopIteration as done:
            session.close()
            served: Served = done.value
            return served
        except HandshakeFailed as exc:
            session.close()
            return exc
        fd = want.sock.fileno()
        active[fd] = (index, session, want, deadline)
        poller.register(fd, select.POLLOUT if want.write else select.POLLIN)
        return None

    def start() -> Iterator[tuple[int, Served | HandshakeFailed]]:
        while len(active) < in_flight:
            item = next(pending, None)
            if item is None:
                return
            index, (address, port, sni) = item
            deadline = time.monotonic() + timeout_s
            outcome = advance(index, _session(address, port, sni, deadline, target), deadline)
            if outcome is not None:
                yield index, outcome

    try:
        yield from start()
        while active:
            now = time.monotonic()
            nearest = min(deadline for _, _, _, deadline in active.values())
            ready = poller.poll(max(0.0, nearest - now) * 1000)
            for fd, _event in ready:
                index, session, _want, deadline = active.pop(fd)
                poller.unregister(fd)
                outcome = advance(index, session, deadline)
                if outcome is not None:
                    yield index, outcome
            now = time.monotonic()
            for fd in [fd for fd, entry in active.items() if entry[3] <= now]:
                index, session, want, _deadline = active.pop(fd)
                poller.unregister(fd)
                session.close()
                yield index, HandshakeFailed(f"timed out during {want.what}")
            yield from start()
    finally:
        for _index, session, _want, _deadline in active.values():
            session.close()
