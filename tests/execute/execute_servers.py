"""Tiny real servers on loopback for probe and runner tests: HTTP(S), TCP, DNS."""

from __future__ import annotations

import datetime as dt
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from depdrill.netns import Target, entered


class Behaviour:
    """What the HTTP server answers; tests change it while the server runs."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"ok healthy"
        self.delay_s = 0.0
        self.hits = 0
        self.fail_first = 0  # answer 503 to this many requests first


@contextmanager
def http_server(
    behaviour: Behaviour, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            behaviour.hits += 1
            if behaviour.delay_s:
                time.sleep(behaviour.delay_s)
            failing = behaviour.hits <= behaviour.fail_first
            self.send_response(503 if failing else behaviour.status)
            self.send_header("Content-Length", str(len(behaviour.body)))
            self.end_headers()
            self.wfile.write(behaviour.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def self_signed(folder: Path, name: str = "localhost") -> tuple[ssl.SSLContext, Path]:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and its PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path


def _opened_in(target: Target | None, make: Callable[[], socket.socket]) -> socket.socket:
    """A socket created inside the target's namespace (it stays there after we return)."""
    if target is None:
        return make()
    with entered(target):
        return make()


@contextmanager
def tcp_listener(host: str = "127.0.0.1", target: Target | None = None) -> Iterator[int]:
    """A listening socket nobody accepts from: the kernel completes handshakes anyway."""
    with _opened_in(target, lambda: socket.create_server((host, 0))) as sock:
        yield sock.getsockname()[1]


@contextmanager
def dns_server(
    answer: Callable[[dns.message.Message], dns.message.Message | None],
    host: str,
    port: int = 53,
    target: Target | None = None,
) -> Iterator[int]:
    """A real UDP name server built on dnspython; `answer` returns None to stay silent."""
    sock = _opened_in(target, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.bind((host, port))
    sock.settimeout(0.05)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                wire, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = answer(dns.message.from_wire(wire))
            if reply is not None:
                sock.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        done.set()
        thread.join()
        sock.close()


def a_record(address: str) -> Callable[[dns.message.Message], dns.message.Message]:
    def answer(query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        qname = query.question[0].name
        if str(qname).startswith("missing"):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        else:
            reply.answer.append(dns.rrset.from_text(qname, 60, "IN", "A", address))
        return reply

    return answer


def _pem(folder: Path, name: str, cert: x509.Certificate) -> Path:
    path = folder / name
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def root_and_leaf(
    folder: Path, address: str, dns_name: str, leaf_days: int
) -> tuple[ssl.SSLContext, Path]:
    """A server context serving leaf + root-signed chain for `dns_name`, and the root's PEM."""
    import ipaddress

    now = dt.datetime.now(dt.UTC)
    root_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ddt test root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(root_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=leaf_days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(dns_name), x509.IPAddress(ipaddress.ip_address(address))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    root_path = _pem(folder, "root.pem", root)
    chain_path = folder / "chain.pem"
    chain_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path = folder / "leaf.key"
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain_path, key_path)
    return context, root_path


@contextmanager
def tls_server(context: ssl.SSLContext, host: str, target: Target | None = None) -> Iterator[int]:
    """Accepts TLS handshakes (then closes) until the block ends."""
    listener = _opened_in(target, lambda: socket.create_server((host, 0)))
    listener.settimeout(0.05)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(2)
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except OSError:
                conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join()
        listener.close()
