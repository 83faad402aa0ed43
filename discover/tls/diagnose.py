"""Findings about a chain, each diagnosed from the chain as sent and the path built from it.

The codes are part of depdrill's interface (reports, suites and users match on them):
see `Code`. Every sentence quotes certificate text with !r, since it is attacker-chosen.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from cryptography import x509
from cryptography.x509 import ocsp

from depdrill.discover.tls.facts import dns_and_ip_sans, is_self_signed, signature_hash_name
from depdrill.discover.tls.model import CertFacts, Finding, Severity
from depdrill.discover.tls.path import ChainPath
from depdrill.discover.tls.trust import Trust

MAX_LEAF_LIFETIME = timedelta(days=398)  # CA/Browser Forum limit for subscriber certificates
MIN_KEY_BITS = {"RSA": 2048, "DSA": 2048, "EC": 224}
WEAK_HASHES = {"md2", "md4", "md5", "sha1"}


class Code(StrEnum):
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRING_SOON = "expiring-soon"
    HOSTNAME_MISMATCH = "hostname-mismatch"
    NO_SAN = "no-san"
    SELF_SIGNED = "self-signed"
    UNTRUSTED_ROOT = "untrusted-root"
    INCOMPLETE_CHAIN = "incomplete-chain"
    WRONG_ORDER = "wrong-order"
    UNUSED_CERT = "unused-cert"
    ANCHOR_SENT = "anchor-sent"
    WEAK_KEY = "weak-key"
    WEAK_SIGNATURE = "weak-signature"
    LONG_LIFETIME = "long-lifetime"
    MUST_STAPLE_MISSING = "must-staple-missing"
    REVOKED = "revoked"
    HANDSHAKE_FAILED = "handshake-failed"
    # cryptography's verifier refused a chain none of the checks above explains
    VERIFICATION_FAILED = "verification-failed"


@dataclass
class Evidence:
    served: list[x509.Certificate]
    served_facts: list[CertFacts]
    path: ChainPath
    path_facts: list[CertFacts]
    trust: Trust
    name: str  # what the client asked for: the SNI, or the address connected to
    warn_days: int
    now: datetime
    ocsp_staple: bytes | None
    verify_error: str | None  # None when cryptography's verifier accepted the chain


def _finding(code: Code, severity: Severity, message: str, index: int | None = None) -> Finding:
    return Finding(code=code.value, severity=severity, message=message, certificate=index)


def _where(facts: CertFacts, index: int | None) -> str:
    position = (
        "the leaf" if index == 0 else f"certificate #{index}" if index is not None else "the anchor"
    )
    return f"{position} {facts.subject!r}"


def hostname_matches(name: str, sans: list[x509.GeneralName]) -> bool:
    """RFC 6125: exact DNS match or a whole-leftmost-label wildcard; IPs match IP SANs only."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is not None:
        return any(isinstance(s, x509.IPAddress) and s.value == address for s in sans)
    try:
        wanted = name.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        wanted = name.rstrip(".").lower()
    for san in sans:
        if not isinstance(san, x509.DNSName):
            continue
        pattern = san.value.rstrip(".").lower()
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "*" not in pattern[2:] and pattern.count(".") >= 2:
            head, _, rest = wanted.partition(".")
            if head and rest == pattern[2:]:
                return True
    return False


def _validity(ev: Evidence) -> list[Finding]:
    out: list[Finding] = []
    last = len(ev.path.certs) - 1
    for position, (cert_facts, index) in enumerate(
        zip(ev.path_facts, ev.path.served_index, strict=True)
    ):
        where = _where(cert_facts, index)
        if cert_facts.not_after < ev.now:
            out.append(
                _finding(
                    Code.EXPIRED,
                    Severity.FAIL,
                    f"{where} expired on {cert_facts.not_after:%Y-%m-%d %H:%M} UTC",
                    index,
                )
            )
        elif cert_facts.not_before > ev.now:
            out.append(
                _finding(
                    Code.NOT_YET_VALID,
                    Severity.FAIL,
                    f"{where} is not valid before {cert_facts.not_before:%Y-%m-%d %H:%M} UTC",
                    index,
                )
            )
        elif cert_facts.days_left <= ev.warn_days and not (
            0 < position == last and ev.path.anchored
        ):
            out.append(
                _finding(
                    Code.EXPIRING_SOON,
                    Severity.WARN,
                    f"{where} expires in {cert_facts.days_left:.1f} days "
                    f"({cert_facts.not_after:%Y-%m-%d}), within the {ev.warn_days}-day window",
                    index,
                )
            )
    return out


def _hostname(ev: Evidence) -> list[Finding]:
    sans = dns_and_ip_sans(ev.served[0])
    if sans is None:
        return [
            _finding(
                Code.NO_SAN,
                Severity.FAIL,
                f"the leaf has no subjectAltName: clients ignore the CN, so {ev.name!r} "
                "cannot match",
                0,
            )
        ]
    if not hostname_matches(ev.name, sans):
        shown = ", ".join(ev.served_facts[0].sans[:5]) or "none usable"
        return [
            _finding(
                Code.HOSTNAME_MISMATCH,
                Severity.FAIL,
                f"{ev.name!r} matches none of the leaf's names ({shown[:300]})",
                0,
            )
        ]
    return []


def _trust_path(ev: Evidence) -> list[Finding]:
    path, leaf = ev.path, ev.served_facts[0]
    if path.end == "self-signed" and len(path.certs) == 1:
        return [
            _finding(
                Code.SELF_SIGNED,
                Severity.FAIL,
                f"the leaf {leaf.subject!r} is self-signed and not in the trust store",
                0,
            )
        ]
    top = ev.path_facts[-1]
    if path.end == "self-signed":
        return [
            _finding(
                Code.UNTRUSTED_ROOT,
                Severity.FAIL,
                f"the chain ends at {top.subject!r}, a root not in the trust store "
                f"({ev.trust.source})",
                path.served_index[-1],
            )
        ]
    if path.end == "missing" and len(path.certs) > 1:
        # The sent intermediates end at a CA whose issuer nobody provides: the usual shape
        # of a private CA whose root the store lacks (a second missing intermediate looks
        # the same from here, and is far rarer).
        return [
            _finding(
                Code.UNTRUSTED_ROOT,
                Severity.FAIL,
                f"the chain ends at {top.subject!r}, whose issuer {top.issuer!r} is "
                f"neither sent nor in the trust store ({ev.trust.source})",
                path.served_index[-1],
            )
        ]
    if path.end == "missing":
        return [
            _finding(
                Code.INCOMPLETE_CHAIN,
                Severity.FAIL,
                f"no certificate sent issues the leaf, and its issuer {leaf.issuer!r} is "
                "not in the trust store; AIA did not supply it",
                0,
            )
        ]
    if path.aia_urls:
        return [
            _finding(
                Code.INCOMPLETE_CHAIN,
                Severity.FAIL,
                f"the server does not send {len(path.aia_urls)} intermediate(s); AIA "
                f"completed the chain from {path.aia_urls[0][:200]!r}, but most "
                "non-browser clients do not fetch AIA and will fail",
                None,
            )
        ]
    return []


def _served_shape(ev: Evidence) -> list[Finding]:
    out: list[Finding] = []
    sent_on_path = [i for i in ev.path.served_index if i is not None]
    if sent_on_path != sorted(sent_on_path):
        out.append(
            _finding(
                Code.WRONG_ORDER,
                Severity.WARN,
                f"certificates are sent in the order {sent_on_path}, not each "
                "followed by its issuer; strict clients reject this",
                None,
            )
        )
    for index, cert_facts in enumerate(ev.served_facts):
        if index in sent_on_path:
            continue
        out.append(
            _finding(
                Code.UNUSED_CERT,
                Severity.WARN,
                f"certificate #{index} {cert_facts.subject!r} is sent but not part "
                "of the path to a trust anchor",
                index,
            )
        )
    if ev.path.anchored and len(ev.path.certs) > 1 and ev.path.served_index[-1] is not None:
        index = ev.path.served_index[-1]
        out.append(
            _finding(
                Code.ANCHOR_SENT,
                Severity.INFO,
                f"the trust anchor {ev.path_facts[-1].subject!r} is sent; clients "
                "ignore it (wasted bytes on every handshake)",
                index,
            )
        )
    return out


def _strength(ev: Evidence) -> list[Finding]:
    out: list[Finding] = []
    last = len(ev.path.certs) - 1
    for position, (cert, cert_facts, index) in enumerate(
        zip(ev.path.certs, ev.path_facts, ev.path.served_index, strict=True)
    ):
        minimum = MIN_KEY_BITS.get(cert_facts.key_type)
        if minimum is not None and 0 < cert_facts.key_size < minimum:
            out.append(
                _finding(
                    Code.WEAK_KEY,
                    Severity.FAIL,
                    f"{_where(cert_facts, index)} has a {cert_facts.key_size}-bit "
                    f"{cert_facts.key_type} key (minimum {minimum})",
                    index,
                )
            )
        # A trust anchor's or a root's own signature is never checked; below it, every one is.
        is_root = position == last and (ev.path.end != "missing" or is_self_signed(cert))
        digest = signature_hash_name(cert) or ""
        algorithm = cert_facts.signature_algorithm.lower()
        if not is_root and (digest in WEAK_HASHES or any(h in algorithm for h in WEAK_HASHES)):
            out.append(
                _finding(
                    Code.WEAK_SIGNATURE,
                    Severity.FAIL,
                    f"{_where(cert_facts, index)} is signed with {cert_facts.signature_algorithm}",
                    index,
                )
            )
    return out


def _leaf_policy(ev: Evidence) -> list[Finding]:
    out: list[Finding] = []
    leaf = ev.served_facts[0]
    lifetime = leaf.not_after - leaf.not_before
    if lifetime > MAX_LEAF_LIFETIME and not (
        ev.path.end == "self-signed" and len(ev.path.certs) == 1
    ):
        out.append(
            _finding(
                Code.LONG_LIFETIME,
                Severity.WARN,
                f"the leaf is valid for {lifetime.days} days, over the "
                f"{MAX_LEAF_LIFETIME.days}-day limit public CAs and browsers enforce",
                0,
            )
        )
    if leaf.must_staple and ev.ocsp_staple is None:
        out.append(
            _finding(
                Code.MUST_STAPLE_MISSING,
                Severity.FAIL,
                "the leaf demands OCSP stapling (must-staple) but the server "
                "stapled no OCSP response",
                0,
            )
        )
    if ev.ocsp_staple is not None:
        out.extend(_staple(ev))
    return out


def _staple(ev: Evidence) -> list[Finding]:
    # The staple's signature is not checked: a server can only harm itself by forging "revoked".
    try:
        response = ocsp.load_der_ocsp_response(ev.ocsp_staple or b"")
        if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            return []
        singles = list(response.responses)
    except Exception:  # a malformed staple is the server's problem, not a crash of ours
        return []
    serial = ev.served[0].serial_number
    for single in singles:
        if (
            single.serial_number == serial
            and single.certificate_status == ocsp.OCSPCertStatus.REVOKED
        ):
            when = single.revocation_time_utc
            return [
                _finding(
                    Code.REVOKED,
                    Severity.FAIL,
                    "the stapled OCSP response says the leaf is revoked"
                    + (f" since {when:%Y-%m-%d}" if when else ""),
                    0,
                )
            ]
    return []


def diagnose(ev: Evidence) -> list[Finding]:
    findings = [
        *_validity(ev),
        *_hostname(ev),
        *_trust_path(ev),
        *_served_shape(ev),
        *_strength(ev),
        *_leaf_policy(ev),
    ]
    if ev.verify_error is not None and not any(f.severity == Severity.FAIL for f in findings):
        findings.append(
            _finding(
                Code.VERIFICATION_FAILED,
                Severity.FAIL,
                f"cryptography's verifier refused the chain: {ev.verify_error[:300]}",
            )
        )
    order = {Severity.FAIL: 0, Severity.WARN: 1, Severity.INFO: 2}
    return sorted(findings, key=lambda f: (order[f.severity], f.code, f.certificate or -1))
