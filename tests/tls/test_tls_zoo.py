"""Each chain defect, served by a real TLS server on loopback, yields its finding code."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tls_zoo import NOW, SNI, Pki, Serve, StaplingServer, ocsp_staple

from depdrill.discover.tls.check import check_endpoint
from depdrill.discover.tls.model import ChainReport, Severity


def check(pki: Pki, address: str, port: int, sni: str | None = SNI, **kw: object) -> ChainReport:
    return check_endpoint(address, port, sni, ca_bundle=pki.bundle, timeout_s=3.0, **kw)  # type: ignore[arg-type]


def codes(report: ChainReport) -> set[str]:
    return {f.code for f in report.findings}


def test_good_chain_has_no_findings(pki: Pki, serve: Serve) -> None:
    # Given a leaf for the SNI name, sent with its intermediate, under a trusted root
    leaf = pki.issue("good", pki.inter)
    with serve([leaf.cert, pki.inter.cert], leaf.key) as ep:
        # When depdrill checks it
        report = check(pki, ep.address, ep.port)
    # Then the chain verifies to the root and nothing is reported
    assert report.findings == []
    assert report.handshake_ok and report.verified
    assert [c.subject for c in report.path] == [
        "CN=good",
        "CN=depdrill zoo intermediate",
        "CN=depdrill zoo root",
    ]
    assert len(report.served) == 2
    assert report.served[0].sans == [SNI]
    assert report.served[0].key_type == "EC" and report.served[0].key_size == 256
    assert report.served[0].signature_algorithm == "ecdsa-with-SHA256"
    assert 88 < report.served[0].days_left < 90
    assert report.earliest_expiry_served == leaf.cert.not_valid_after_utc
    assert report.earliest_expiry_path == leaf.cert.not_valid_after_utc
    assert report.protocol == "TLSv1.3"


def test_expired_leaf(pki: Pki, serve: Serve) -> None:
    # Given a leaf that expired yesterday
    leaf = pki.issue("expired", pki.inter, not_before=NOW - timedelta(days=30), days=29)
    with serve([leaf.cert, pki.inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    # Then it is an expired failure on certificate 0, and nothing else
    assert codes(report) == {"expired"}
    assert report.findings[0].certificate == 0 and report.findings[0].severity == Severity.FAIL
    assert not report.verified


def test_expiring_soon_leaf_and_warn_window(pki: Pki, serve: Serve) -> None:
    # Given a leaf with 10 days left
    leaf = pki.issue("soon", pki.inter, days=11)
    with serve([leaf.cert, pki.inter.cert], leaf.key) as ep:
        # When checked with the default 30-day window, and with a 5-day one
        wide = check(pki, ep.address, ep.port)
        narrow = check(pki, ep.address, ep.port, warn_days=5)
    # Then only the wide window warns; the chain still verifies
    assert codes(wide) == {"expiring-soon"}
    assert wide.findings[0].severity == Severity.WARN and wide.verified
    assert codes(narrow) == set()


def test_expiring_soon_intermediate_sets_earliest_expiry(pki: Pki, serve: Serve) -> None:
    # Given an intermediate with 20 days left, and a leaf with 80
    inter = pki.issue(
        "short intermediate", pki.root, key=pki.inter.key, ca=True, sans=None, days=21
    )
    leaf = pki.issue("good", inter, days=81)
    with serve([leaf.cert, inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    # Then the intermediate is flagged and is the earliest expiry, served and on the path
    assert codes(report) == {"expiring-soon"}
    assert report.findings[0].certificate == 1
    assert report.earliest_expiry_served == inter.cert.not_valid_after_utc
    assert report.earliest_expiry_path == inter.cert.not_valid_after_utc


def test_hostname_mismatch(pki: Pki, serve: Serve) -> None:
    leaf = pki.issue("other", pki.inter, sans=("other.zoo.test", "*.zoo.example"))
    with serve([leaf.cert, pki.inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"hostname-mismatch"}


def test_wildcard_matches_one_label_only(pki: Pki, serve: Serve) -> None:
    # Given a wildcard leaf for *.zoo.test
    leaf = pki.issue("wild", pki.inter, sans=("*.zoo.test",))
    with serve([leaf.cert, pki.inter.cert], leaf.key) as ep:
        one_label = check(pki, ep.address, ep.port, sni="good.zoo.test")
        two_labels = check(pki, ep.address, ep.port, sni="a.good.zoo.test")
    # Then it covers good.zoo.test but not a.good.zoo.test
    assert codes(one_label) == set()
    assert codes(two_labels) == {"hostname-mismatch"}


def test_no_san(pki: Pki, serve: Serve) -> None:
    leaf = pki.issue(SNI, pki.inter, sans=None)
    with serve([leaf.cert, pki.inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"no-san"}


def test_self_signed_leaf(pki: Pki, serve: Serve) -> None:
    leaf = pki.issue("self", None)
    with serve([leaf.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"self-signed"}
    assert report.path == [] and not report.verified


def test_untrusted_root_sent(pki: Pki, serve: Serve) -> None:
    # Given a full chain from a CA the bundle does not hold, root included
    leaf = pki.issue("stranger", pki.other_inter)
    chain = [leaf.cert, pki.other_inter.cert, pki.other_root.cert]
    with serve(chain, leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"untrusted-root"}
    assert report.findings[0].certificate == 2


def test_untrusted_root_not_sent(pki: Pki, serve: Serve) -> None:
    leaf = pki.issue("stranger", pki.other_inter)
    with serve([leaf.cert, pki.other_inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"untrusted-root"}


def test_incomplete_chain(pki: Pki, serve: Serve) -> None:
    # Given a server that sends only its leaf, with no AIA to find the intermediate
    leaf = pki.issue("lonely", pki.inter)
    with serve([leaf.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"incomplete-chain"}
    assert "AIA did not supply it" in report.findings[0].message
    assert report.path == []


def test_incomplete_chain_completed_by_aia(pki: Pki, serve: Serve, aia_server) -> None:  # type: ignore[no-untyped-def]
    # Given a leaf sent alone, whose AIA CA Issuers URL serves the intermediate (DER)
    url = aia_server(pki.inter.cert.public_bytes(serialization.Encoding.DER))
    leaf = pki.issue("aia", pki.inter, aia_url=url)
    with serve([leaf.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    # Then the chain is still reported incomplete, and says AIA completed it
    assert codes(report) == {"incomplete-chain"}
    assert "AIA completed the chain" in report.findings[0].message
    assert report.aia_fetched == [url]
    assert report.verified and len(report.path) == 3


def test_wrong_order(pki: Pki, serve: Serve) -> None:
    # Given root -> inter -> inter2 -> leaf, with the two intermediates sent swapped
    inter2 = pki.issue(
        "second intermediate", pki.inter, key=pki.other_inter.key, ca=True, sans=None
    )
    leaf = pki.issue("deep", inter2)
    with serve([leaf.cert, pki.inter.cert, inter2.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"wrong-order"}
    assert len(report.path) == 4


def test_unused_cert(pki: Pki, serve: Serve) -> None:
    leaf = pki.issue("good", pki.inter)
    with serve([leaf.cert, pki.inter.cert, pki.other_inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"unused-cert"}
    assert report.findings[0].certificate == 2 and report.verified


def test_anchor_sent_is_info(pki: Pki, serve: Serve) -> None:
    leaf = pki.issue("good", pki.inter)
    with serve([leaf.cert, pki.inter.cert, pki.root.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"anchor-sent"}
    assert report.worst == Severity.INFO and report.verified


def test_weak_rsa_leaf_key(pki: Pki, serve: Serve) -> None:
    # Given a 1024-bit RSA leaf: cryptography's verifier does not check a leaf's key size
    key = rsa.generate_private_key(65537, 1024)
    leaf = pki.issue("weak", pki.inter, key=key)
    with serve([leaf.cert, pki.inter.cert], key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"weak-key"}
    assert report.served[0].key_type == "RSA" and report.served[0].key_size == 1024


def test_weak_sha1_intermediate(pki: Pki, serve: Serve) -> None:
    # Given an intermediate the trusted root signed with SHA-1
    inter = pki.sha1_intermediate()
    leaf = pki.issue("sha1", inter)
    with serve([leaf.cert, inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"weak-signature"}
    assert report.findings[0].certificate == 1
    assert report.served[1].signature_algorithm == "ecdsa-with-SHA1"


def test_long_lifetime(pki: Pki, serve: Serve) -> None:
    leaf = pki.issue("long", pki.inter, days=500)
    with serve([leaf.cert, pki.inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"long-lifetime"}


def test_not_yet_valid(pki: Pki, serve: Serve) -> None:
    leaf = pki.issue("future", pki.inter, not_before=NOW + timedelta(days=2))
    with serve([leaf.cert, pki.inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"not-yet-valid"}


def test_must_staple_without_staple(pki: Pki, serve: Serve) -> None:
    leaf = pki.issue("staple", pki.inter, must_staple=True)
    with serve([leaf.cert, pki.inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port)
    assert codes(report) == {"must-staple-missing"}
    assert report.served[0].must_staple and not report.stapled


@pytest.mark.parametrize("sni", [None, "127.0.0.1"])
def test_ip_address_without_sni_matches_ip_san_only(
    pki: Pki, serve: Serve, sni: str | None
) -> None:
    # Given a leaf with only a DNS name, reached by IP address
    leaf = pki.issue("good", pki.inter)
    with serve([leaf.cert, pki.inter.cert], leaf.key) as ep:
        report = check(pki, ep.address, ep.port, sni=sni)
    # Then the address does not match the leaf's names
    assert codes(report) == {"hostname-mismatch"}


@pytest.mark.parametrize("revoked", [False, True], ids=["good-staple", "revoked-staple"])
def test_stapled_ocsp_response(pki: Pki, revoked: bool) -> None:
    # Given a must-staple leaf, served by a server that staples an OCSP response for it
    leaf = pki.issue("stapled", pki.inter, must_staple=True)
    staple = ocsp_staple(leaf.cert, pki.inter, revoked=revoked)
    with StaplingServer([leaf.cert, pki.inter.cert], leaf.key, staple) as ep:
        report = check(pki, ep.address, ep.port)
    # Then the staple is seen; a good one satisfies must-staple, a revoked one fails
    assert report.stapled
    assert codes(report) == ({"revoked"} if revoked else set())
