"""What depdrill learns about one TLS endpoint: the chain as sent, the path built, findings."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from depdrill.artifact import Frozen


class Severity(StrEnum):
    FAIL = "fail"
    WARN = "warn"
    INFO = "info"


class Finding(Frozen):
    """One defect or fact about a chain. `code` is part of depdrill's interface."""

    code: str  # expired, not-yet-valid, expiring-soon, hostname-mismatch, ... (see diagnose.Code)
    severity: Severity
    message: str
    certificate: int | None = None  # index into ChainReport.served, when it is about one


class CertFacts(Frozen):
    """One certificate's facts. Every text field is attacker-chosen: never trust it."""

    subject: str
    issuer: str
    serial: str  # hex
    not_before: datetime
    not_after: datetime
    days_left: float
    key_type: str  # RSA, EC, Ed25519, Ed448, DSA
    key_size: int
    signature_algorithm: str
    sans: list[str] = []
    is_ca: bool = False
    self_issued: bool = False
    ca_issuers: list[str] = []  # AIA CA Issuers URLs
    ocsp: list[str] = []
    crl: list[str] = []
    sct_count: int = 0
    must_staple: bool = False
    fingerprint_sha256: str
    pem: str
    problems: list[str] = []  # fields that could not be parsed (malformed or duplicate extensions)


class ChainReport(Frozen):
    """A TLS endpoint's chain health, as of `checked`."""

    host: str  # the address or name connected to
    port: int
    sni: str | None = None
    checked: datetime
    handshake_ok: bool
    protocol: str | None = None  # TLSv1.3
    cipher: str | None = None
    served: list[CertFacts] = []  # wire order
    path: list[CertFacts] = []  # leaf first, up to the trust anchor; empty if none was built
    verified: bool = False
    stapled: bool = False  # the server stapled an OCSP response
    aia_fetched: list[str] = []  # AIA CA Issuers URLs that supplied a missing intermediate
    findings: list[Finding] = []
    earliest_expiry_served: datetime | None = None
    earliest_expiry_path: datetime | None = None

    @property
    def worst(self) -> Severity | None:
        order = [Severity.FAIL, Severity.WARN, Severity.INFO]
        present = {f.severity for f in self.findings}
        return next((s for s in order if s in present), None)
