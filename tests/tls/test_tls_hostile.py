"""Certificates are attacker text: randomly corrupted ones never crash facts or diagnosis."""

from __future__ import annotations

import random
import warnings
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tls_zoo import SNI, Pki

from depdrill.discover.tls.check import _verify
from depdrill.discover.tls.diagnose import Evidence, diagnose, hostname_matches
from depdrill.discover.tls.facts import cert_facts
from depdrill.discover.tls.path import build_path
from depdrill.discover.tls.trust import load_trust


def _mutants(der: bytes, count: int, seed: int) -> list[x509.Certificate]:
    rng = random.Random(seed)
    found: list[x509.Certificate] = []
    for _ in range(count):
        data = bytearray(der)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if data == der:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some mutants only earn a deprecation warning
            try:
                found.append(x509.load_der_x509_certificate(bytes(data)))
            except (ValueError, x509.InvalidVersion):
                continue
    return found


def test_corrupted_certificates_become_facts_and_findings(pki: Pki) -> None:
    # Given thousands of leaves and intermediates with random bytes changed that the parser
    # still accepts (its names are parsed lazily, so many fail only when read)
    leaf = pki.issue("hostile", pki.inter, aia_url="http://127.0.0.1:9/x.der", must_staple=True)
    leaf_der = leaf.cert.public_bytes(serialization.Encoding.DER)
    inter_der = pki.inter.cert.public_bytes(serialization.Encoding.DER)
    chains = [[m, pki.inter.cert] for m in _mutants(leaf_der, 5000, seed=4)]
    chains += [[leaf.cert, m] for m in _mutants(inter_der, 3000, seed=5)]
    assert len(chains) > 1000
    trust = load_trust(pki.bundle)
    now = datetime.now(UTC)
    for chain in chains:
        # When each is read, walked, verified and diagnosed as a served chain
        path = build_path(chain, trust)
        verified, error = _verify(chain[0], chain[1:], trust, SNI, now)
        findings = diagnose(
            Evidence(
                served=chain,
                served_facts=[cert_facts(c, now) for c in chain],
                path=path,
                path_facts=[cert_facts(c, now) for c in path.certs],
                trust=trust,
                name=SNI,
                warn_days=30,
                now=now,
                ocsp_staple=b"\x30\x03\x0a\x01\x00",  # a staple saying "malformedRequest"
                verify_error=error,
            )
        )
        # Then nothing raises, and a corrupted chain never passes as clean and verified
        assert findings and verified is None


def test_hostname_matching_refuses_partial_and_deep_wildcards() -> None:
    names = [x509.DNSName(n) for n in ("*.zoo.test", "f*.bad.test", "*.test", "exact.test.")]
    assert hostname_matches("a.zoo.test", names)
    assert hostname_matches("EXACT.test", names)
    assert not hostname_matches("a.b.zoo.test", names)
    assert not hostname_matches("foo.bad.test", names)
    assert not hostname_matches("zoo.test", names)
    assert not hostname_matches("anything.test", names)
    assert not hostname_matches("127.0.0.1", names)
