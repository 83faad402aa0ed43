"""Trust anchors: the system store or a CA bundle given, loaded once per file version."""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.verification import Store

from depdrill.errors import InputError

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_loading = threading.Lock()  # concurrent endpoint checks share one parse of the bundle


@dataclass(frozen=True)
class Trust:
    source: Path
    anchors: tuple[x509.Certificate, ...]
    members: frozenset[x509.Certificate]  # certificates hash and compare by their DER
    store: Store

    def contains(self, cert: x509.Certificate) -> bool:
        return cert in self.members

    def issuers_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        try:
            issuer = cert.issuer
        except Exception:  # parsed lazily: an attacker's malformed issuer name
            return []
        return [a for a in self.anchors if a.subject == issuer]


def load_trust(ca_bundle: Path | None = None) -> Trust:
    """Read a PEM bundle (default: the system store); InputError in one line if unusable."""
    path = ca_bundle if ca_bundle is not None else SYSTEM_BUNDLE
    try:
        stat = path.stat()
    except OSError as exc:
        raise InputError(f"CA bundle {path}: {exc.strerror or exc}") from None
    with _loading:
        return _load(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load(path: Path, _mtime_ns: int, _size: int) -> Trust:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"CA bundle {path}: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings():
            # Real bundles carry old roots with non-positive serials; they still anchor.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            anchors = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise InputError(f"CA bundle {path}: not a PEM certificate bundle ({exc})") from None
    if not anchors:
        raise InputError(f"CA bundle {path}: holds no certificate")
    return Trust(
        source=path,
        anchors=anchors,
        members=frozenset(anchors),
        store=Store(list(anchors)),
    )
