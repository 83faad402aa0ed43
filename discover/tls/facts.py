"""CertFacts from a certificate: every field read defensively, since all of it is attacker text."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID

from depdrill.discover.tls.model import CertFacts

T = TypeVar("T")
SECONDS_PER_DAY = 86400.0


def _read(what: str, problems: list[str], read: Callable[[], T], fallback: T) -> T:
    """Read one field; a malformed field becomes a recorded problem, never a crash."""
    try:
        return read()
    except Exception as exc:  # the parser raises ValueError, UnsupportedAlgorithm, and more
        problems.append(f"{what}: {exc}")
        return fallback


def subject_of(cert: x509.Certificate) -> x509.Name | None:
    """The subject, or None when it does not parse (names are parsed lazily, on access)."""
    try:
        return cert.subject
    except Exception:  # ValueError, TypeError: whatever a malformed attribute provokes
        return None


def issuer_of(cert: x509.Certificate) -> x509.Name | None:
    try:
        return cert.issuer
    except Exception:  # as subject_of
        return None


def name_text(name: x509.Name | None) -> str:
    if name is None:
        return "<unparseable name>"
    try:
        return name.rfc4514_string()
    except Exception:  # attribute values the formatter cannot render
        return "<unreadable name>"


def public_key_kind(cert: x509.Certificate) -> tuple[str, int]:
    """("RSA", 2048), ("EC", 256)...; ("unknown", 0) for key types the library cannot load."""
    try:
        key = cert.public_key()
    except Exception:
        return "unknown", 0
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC", key.curve.key_size
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448", 456
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size
    return type(key).__name__, 0


def signature_algorithm_name(cert: x509.Certificate) -> str:
    oid = cert.signature_algorithm_oid
    name = oid._name
    return name if name and name != "Unknown OID" else oid.dotted_string


def signature_hash_name(cert: x509.Certificate) -> str | None:
    """ "sha1", "md5", "sha256"...; None for hashless schemes (Ed25519) or unknown ones."""
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:
        return None
    return algorithm.name if algorithm is not None else None


def general_name_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return name.value
    if isinstance(name, x509.IPAddress):
        value = name.value
        return (
            str(value)
            if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address)
            else f"IP:{value}"
        )
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    return f"{type(name).__name__}:{getattr(name, 'value', '')!s}"


def _extensions(
    cert: x509.Certificate, problems: list[str]
) -> list[x509.Extension[x509.ExtensionType]]:
    return _read("extensions", problems, lambda: list(cert.extensions), [])


def _find(
    extensions: list[x509.Extension[x509.ExtensionType]], oid: x509.ObjectIdentifier
) -> x509.ExtensionType | None:
    return next((e.value for e in extensions if e.oid == oid), None)


def dns_and_ip_sans(cert: x509.Certificate) -> list[x509.GeneralName] | None:
    """The SAN entries; None when the certificate has no (readable) SAN extension."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except Exception:
        return None
    return list(ext.value)


def is_self_signed(cert: x509.Certificate) -> bool:
    """Issued by itself: same name and its own key verifies its signature."""
    subject = subject_of(cert)
    if subject is None or issuer_of(cert) != subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except InvalidSignature:
        return False
    except (UnsupportedAlgorithm, ValueError):
        return True  # a SHA-1 or MD5 root: the names agree and the library will not check
    return True


def cert_facts(cert: x509.Certificate, now: datetime) -> CertFacts:
    problems: list[str] = []
    extensions = _extensions(cert, problems)
    sans: list[str] = []
    san = _find(extensions, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    if isinstance(san, x509.SubjectAlternativeName):
        sans = [general_name_text(n) for n in san]
    basic = _find(extensions, ExtensionOID.BASIC_CONSTRAINTS)
    ca_issuers: list[str] = []
    ocsp: list[str] = []
    aia = _find(extensions, ExtensionOID.AUTHORITY_INFORMATION_ACCESS)
    if isinstance(aia, x509.AuthorityInformationAccess):
        for desc in aia:
            if not isinstance(desc.access_location, x509.UniformResourceIdentifier):
                continue
            if desc.access_method == AuthorityInformationAccessOID.CA_ISSUERS:
                ca_issuers.append(desc.access_location.value)
            elif desc.access_method == AuthorityInformationAccessOID.OCSP:
                ocsp.append(desc.access_location.value)
    crl: list[str] = []
    dps = _find(extensions, ExtensionOID.CRL_DISTRIBUTION_POINTS)
    if isinstance(dps, x509.CRLDistributionPoints):
        for point in dps:
            crl.extend(
                n.value
                for n in point.full_name or []
                if isinstance(n, x509.UniformResourceIdentifier)
            )
    scts = _find(extensions, ExtensionOID.PRECERT_SIGNED_CERTIFICATE_TIMESTAMPS)
    sct_count = (
        _read("SCT list", problems, lambda: len(list(scts)), 0)
        if isinstance(scts, x509.PrecertificateSignedCertificateTimestamps)
        else 0
    )
    feature = _find(extensions, ExtensionOID.TLS_FEATURE)
    must_staple = isinstance(feature, x509.TLSFeature) and (
        x509.TLSFeatureType.status_request in list(feature)
    )
    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    key_type, key_size = public_key_kind(cert)
    # Each access to .subject or .issuer builds a new Name in Python: read each once.
    subject, issuer = subject_of(cert), issuer_of(cert)
    return CertFacts(
        subject=name_text(subject),
        issuer=name_text(issuer),
        serial=_read("serial", problems, lambda: format(cert.serial_number, "x"), ""),
        not_before=not_before,
        not_after=not_after,
        days_left=round((not_after - now).total_seconds() / SECONDS_PER_DAY, 2),
        key_type=key_type,
        key_size=key_size,
        signature_algorithm=signature_algorithm_name(cert),
        sans=sans,
        is_ca=isinstance(basic, x509.BasicConstraints) and basic.ca,
        self_issued=subject is not None and issuer == subject,
        ca_issuers=ca_issuers,
        ocsp=ocsp,
        crl=crl,
        sct_count=sct_count,
        must_staple=must_staple,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        problems=problems,
    )
