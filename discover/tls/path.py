"""Build the path from the leaf to a trust anchor out of the chain as sent (plus AIA), by hand.

cryptography's verifier builds a path too, but when it fails it says only "all candidates
exhausted"; this walk remembers where and why it stopped, which is what `diagnose` needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from depdrill.discover.tls.facts import is_self_signed, issuer_of, subject_of
from depdrill.discover.tls.trust import Trust

MAX_DEPTH = 10  # no public chain is longer; stops loops of cross-signed certificates
End = Literal["anchor", "self-signed", "missing"]
# Given the certificate whose issuer is missing: (url, certificates found there) pairs.
AiaLookup = Callable[[x509.Certificate], list[tuple[str, list[x509.Certificate]]]]


@dataclass
class ChainPath:
    certs: list[x509.Certificate]  # leaf first
    served_index: list[int | None]  # per certificate on the path: its index in the chain as sent
    end: End
    aia_urls: list[str] = field(default_factory=list)  # URLs that supplied path certificates

    @property
    def anchored(self) -> bool:
        return self.end == "anchor"


def _key_ids_agree(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """The child's authority key id names the parent's key (True when either id is absent)."""
    try:
        aki = child.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = parent.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except Exception:  # absent or unreadable: the names alone decide
        return True
    return aki.key_identifier is None or aki.key_identifier == ski.digest


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Parent's name and key issued child. A signature the library refuses to check (SHA-1,
    MD5) is judged by name and key identifiers, so a weak chain is still walked and then
    reported as weak rather than as broken."""
    issuer = issuer_of(child)
    if issuer is None or issuer != subject_of(parent):
        return False
    try:
        child.verify_directly_issued_by(parent)
    except InvalidSignature:
        return False
    except (UnsupportedAlgorithm, ValueError):
        return _key_ids_agree(child, parent)
    return True


def from_verified(served: list[x509.Certificate], verified: list[x509.Certificate]) -> ChainPath:
    """The path cryptography's verifier accepted, with each certificate's place as sent."""
    first_index = {c: i for i, c in reversed(list(enumerate(served)))}
    return ChainPath(
        certs=list(verified),
        served_index=[first_index.get(c) for c in verified],
        end="anchor",
    )


def build_path(
    served: list[x509.Certificate], trust: Trust, aia: AiaLookup | None = None
) -> ChainPath:
    first_index = {c: i for i, c in reversed(list(enumerate(served)))}
    path = ChainPath(certs=[served[0]], served_index=[0], end="missing")

    def add(cert: x509.Certificate) -> None:
        path.certs.append(cert)
        path.served_index.append(first_index.get(cert))

    for _ in range(MAX_DEPTH):
        current = path.certs[-1]
        if trust.contains(current):
            path.end = "anchor"
            return path
        if is_self_signed(current):
            path.end = "self-signed"
            return path
        anchor = next((a for a in trust.issuers_of(current) if issued_by(current, a)), None)
        if anchor is not None:
            add(anchor)
            path.end = "anchor"
            return path
        on_path = {i for i in path.served_index if i is not None}
        parent = next(
            (c for i, c in enumerate(served) if i not in on_path and issued_by(current, c)), None
        )
        if parent is not None and parent not in path.certs:
            add(parent)
            continue
        if aia is None:
            return path
        found = None
        for url, certs in aia(current):
            found = next((c for c in certs if issued_by(current, c)), None)
            if found is not None:
                path.aia_urls.append(url)
                break
        if found is None or found in path.certs:
            return path
        add(found)
    return path
