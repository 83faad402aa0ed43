"""The TLS zoo: a test PKI made by cryptography (and openssl), servers on loopback.

Keys are made once per session (EC P-256 where the defect does not need RSA) so the whole
zoo stays fast; each test starts its own server in a thread and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from depdrill.netns import Target, entered

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
NOW = datetime.now(UTC)
SNI = "good.zoo.test"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Issued:
    cert: x509.Certificate
    key: PrivateKey


class Pki:
    """Makes certificates; `root`/`inter` are trusted through `bundle`, `other_*` are not."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self.ca("depdrill zoo root", None)
        self.inter = self.ca("depdrill zoo intermediate", self.root)
        self.other_root = self.ca("stranger root", None)
        self.other_inter = self.ca("stranger intermediate", self.other_root)
        self.bundle = workdir / "bundle.pem"
        self.bundle.write_bytes(self.root.cert.public_bytes(serialization.Encoding.PEM))

    def ca(self, cn: str, issuer: Issued | None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        return self.issue(cn, issuer, key=key, ca=True, sans=None, days=3650)

    def issue(
        self,
        cn: str,
        issuer: Issued | None,
        *,
        key: PrivateKey | None = None,
        sans: tuple[str, ...] | None = (SNI,),
        ca: bool = False,
        not_before: datetime | None = None,
        days: float = 90,
        must_staple: bool = False,
        aia_url: str | None = None,
        critical_extra: x509.ExtensionType | None = None,
    ) -> Issued:
        key = key or self.leaf_key
        not_before = not_before or NOW - timedelta(days=1)
        signer = issuer.key if issuer else key
        issuer_name = issuer.cert.subject if issuer else _name(cn)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        usage = dict.fromkeys(
            (
                "digital_signature",
                "content_commitment",
                "key_encipherment",
                "data_encipherment",
                "key_agreement",
                "key_cert_sign",
                "crl_sign",
                "encipher_only",
                "decipher_only",
            ),
            False,
        )
        if ca:
            usage.update(key_cert_sign=True, crl_sign=True)
        else:
            usage.update(digital_signature=True)
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
            )
        if sans is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False
            )
        if must_staple:
            builder = builder.add_extension(
                x509.TLSFeature([x509.TLSFeatureType.status_request]), critical=False
            )
        if aia_url is not None:
            builder = builder.add_extension(
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.CA_ISSUERS,
                            x509.UniformResourceIdentifier(aia_url),
                        )
                    ]
                ),
                critical=False,
            )
        if critical_extra is not None:
            builder = builder.add_extension(critical_extra, critical=True)
        return Issued(builder.sign(signer, hashes.SHA256()), key)

    def sha1_intermediate(self) -> Issued:
        """An intermediate signed with SHA-1 by the trusted root: cryptography refuses to
        sign with SHA-1, so the openssl CLI does it."""
        d = Path(tempfile.mkdtemp(dir=self.workdir))
        key = ec.generate_private_key(ec.SECP256R1())
        pem = serialization.Encoding.PEM
        plain = serialization.NoEncryption()
        pkcs8 = serialization.PrivateFormat.PKCS8
        (d / "root.pem").write_bytes(self.root.cert.public_bytes(pem))
        (d / "root.key").write_bytes(self.root.key.private_bytes(pem, pkcs8, plain))
        (d / "inter.key").write_bytes(key.private_bytes(pem, pkcs8, plain))
        (d / "ext.cnf").write_text(
            "[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)  # noqa: E731
        run(
            "openssl",
            "req",
            "-new",
            "-key",
            "inter.key",
            "-subj",
            "/CN=depdrill zoo sha1 intermediate",
            "-out",
            "inter.csr",
        )
        run(
            "openssl",
            "x509",
            "-req",
            "-in",
            "inter.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-sha1",
            "-days",
            "365",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "v3",
            "-out",
            "inter.pem",
        )
        return Issued(x509.load_pem_x509_certificate((d / "inter.pem").read_bytes()), key)


@dataclass
class Endpoint:
    address: str
    port: int


class TlsServer:
    """A Python ssl server in a thread serving `chain` in exactly the order given."""

    def __init__(
        self,
        chain: list[x509.Certificate],
        key: PrivateKey,
        workdir: Path,
        bind: tuple[str, int] = ("127.0.0.1", 0),
        inside: Target | None = None,
    ) -> None:
        pem = serialization.Encoding.PEM
        certfile = workdir / f"chain-{id(self)}.pem"
        keyfile = workdir / f"key-{id(self)}.pem"
        certfile.write_bytes(b"".join(c.public_bytes(pem) for c in chain))
        keyfile.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.set_ciphers("DEFAULT:@SECLEVEL=0")  # lets it serve 1024-bit and SHA-1
        self.context.load_cert_chain(certfile, keyfile)
        with entered(inside) if inside else contextlib.nullcontext():
            self.listener = socket.create_server(bind)
        self.listener.settimeout(0.05)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError), self.context.wrap_socket(conn, server_side=True):
                    pass

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return Endpoint(*self.listener.getsockname()[:2])

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.listener.close()


Serve = Callable[[list[x509.Certificate], PrivateKey], contextlib.AbstractContextManager[Endpoint]]


class AiaServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class StaplingServer:
    """A pyOpenSSL server in a thread that staples `staple` (DER OCSP) when asked to."""

    def __init__(self, chain: list[x509.Certificate], key: PrivateKey, staple: bytes) -> None:
        from OpenSSL import SSL

        self.ssl = SSL
        self.context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.context.use_certificate(chain[0])
        self.context.use_privatekey(key)
        for cert in chain[1:]:
            self.context.add_extra_chain_cert(cert)
        self.context.set_ocsp_server_callback(lambda _conn, _data: staple)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            with sock:
                sock.setblocking(True)
                conn = self.ssl.Connection(self.context, sock)
                conn.set_accept_state()
                with contextlib.suppress(self.ssl.Error):
                    conn.do_handshake()

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return Endpoint(*self.listener.getsockname()[:2])

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.listener.close()


def ocsp_staple(leaf: x509.Certificate, issuer: Issued, *, revoked: bool) -> bytes:
    status = ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=leaf,
        issuer=issuer.cert,
        algorithm=hashes.SHA256(),
        cert_status=status,
        this_update=NOW - timedelta(hours=1),
        next_update=NOW + timedelta(days=1),
        revocation_time=NOW - timedelta(days=3) if revoked else None,
        revocation_reason=None,
    )
    response = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.cert).sign(
        issuer.key, hashes.SHA256()
    )
    return response.public_bytes(serialization.Encoding.DER)
