"""The TLS stage's surface: graph walks, target parsing, bad bundles, hostile certificate fields."""

from __future__ import annotations

import random
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tls_zoo import SNI, Pki, TlsServer

from depdrill.discover.model import (
    AddressNode,
    AnswerEdge,
    CaptureStats,
    ConnectsEdge,
    EndpointNode,
    Graph,
    NameNode,
    NamesEdge,
    ResolvedEdge,
    ServiceNode,
    address_id,
    endpoint_id,
    name_id,
)
from depdrill.discover.tls.check import check_endpoint, check_graph, parse_target, tls_endpoints
from depdrill.discover.tls.facts import cert_facts
from depdrill.errors import InputError
from depdrill.netns import Target


def _graph(endpoints: list[tuple[str, int, str, str | None]]) -> Graph:
    """A graph where the service resolved each name and connected to its endpoint;
    `via` "sni" ties the endpoint to the name by SNI, None only by the DNS answer."""
    now = datetime.now(UTC)
    nodes: list[object] = [ServiceNode(label="svc")]
    links: list[object] = []
    for address, port, name, via in endpoints:
        ep = endpoint_id(address, port, "tcp")
        nodes += [
            NameNode(id=name_id(name), name=name),
            AddressNode(id=address_id(address), address=address, family=4),
            EndpointNode(id=ep, address=address, port=port, proto="tcp"),
        ]
        links += [
            ResolvedEdge(source="service", target=name_id(name), count=1),
            AnswerEdge(source=name_id(name), target=address_id(address), rtype="A"),
            ConnectsEdge(source="service", target=ep, count=1),
        ]
        if via is not None:
            links.append(NamesEdge(source=ep, target=name_id(name), via="sni"))
    return Graph(
        target="test", capture=CaptureStats(started=now, ended=now), nodes=nodes, links=links
    )  # type: ignore[arg-type]


def test_check_graph_fills_tls_endpoints_only(pki: Pki, tmp_path: Path) -> None:
    # Given a graph with three endpoints: one tied to its name by SNI on a random port, one
    # on 443 known only from DNS answers (both TLS), and one plain port with no SNI
    leaf = pki.issue("good", pki.inter)
    leaf_443 = pki.issue("api", pki.inter, sans=("api.zoo.test",))
    loopback = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    with (
        TlsServer([leaf.cert, pki.inter.cert], leaf.key, tmp_path) as by_sni,
        TlsServer(
            [leaf_443.cert, pki.inter.cert], leaf_443.key, tmp_path, (loopback, 443)
        ) as on_443,
    ):
        graph = _graph(
            [
                (by_sni.address, by_sni.port, SNI, "sni"),
                (on_443.address, 443, "api.zoo.test", None),
                ("127.0.0.3", 6379, "cache.zoo.test", None),
            ]
        )
        # When the graph's TLS endpoints are checked
        checked = check_graph(graph, ca_bundle=pki.bundle, timeout_s=3.0)
    # Then both TLS endpoints carry a clean, verified report checked with the right SNI,
    # and the plain one is untouched
    reports = {n.port: n.tls for n in checked.nodes if isinstance(n, EndpointNode)}
    assert reports[6379] is None
    for port, sni in ((by_sni.port, SNI), (443, "api.zoo.test")):
        report = reports[port]
        assert report is not None and report.sni == sni
        assert report.verified and report.findings == []
    # and the graph still round-trips through its JSON form, and the dependencies see it
    assert Graph.model_validate_json(checked.model_dump_json(by_alias=True)) == checked
    tls_names = {d.name for d in checked.dependencies() if d.tls_endpoints}
    assert tls_names == {SNI, "api.zoo.test"}
    assert len(tls_endpoints(graph)) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("api.example.com", ("api.example.com", 443)),
        ("API.Example.com.:8443", ("api.example.com", 8443)),
        ("198.18.0.5:636", ("198.18.0.5", 636)),
        ("[::1]:853", ("::1", 853)),
        ("::1", ("::1", 443)),
    ],
)
def test_parse_target(text: str, expected: tuple[str, int]) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    "text", ["", "host:0", "host:70000", "host:https", "[::1", "[::1]x", "bad host", "a..b", "-x-"]
)
def test_parse_target_refuses_bad_input(text: str) -> None:
    with pytest.raises(InputError) as err:
        parse_target(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [None, b"", b"not a certificate\n"])
def test_bad_ca_bundle_is_one_line_input_error(tmp_path: Path, content: bytes | None) -> None:
    # Given a CA bundle that is missing, empty, or not PEM
    bundle = tmp_path / "bundle.pem"
    if content is not None:
        bundle.write_bytes(content)
    # Then checking refuses it in one line, before connecting anywhere
    with pytest.raises(InputError) as err:
        check_endpoint("127.0.0.1", 9, None, ca_bundle=bundle, timeout_s=0.2)
    assert str(bundle) in str(err.value) and "\n" not in str(err.value)


def _patched(cert: x509.Certificate, old: bytes, new: bytes) -> x509.Certificate:
    der = cert.public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1
    return x509.load_der_x509_certificate(der.replace(old, new))


def test_duplicate_extensions_and_unknown_key_do_not_crash_facts(pki: Pki) -> None:
    # Given a leaf rewritten so that its two alt-name extensions are both SAN (a duplicate),
    # and one whose key algorithm is an OID nobody knows
    leaf = pki.issue("odd", pki.inter)
    with_ian = (
        x509.CertificateBuilder(
            issuer_name=leaf.cert.issuer,
            subject_name=leaf.cert.subject,
            public_key=leaf.key.public_key(),
            serial_number=7,
            not_valid_before=leaf.cert.not_valid_before_utc,
            not_valid_after=leaf.cert.not_valid_after_utc,
            extensions=[],
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SNI)]), False)
        .add_extension(x509.IssuerAlternativeName([x509.DNSName("ian.zoo.test")]), False)
        .sign(pki.inter.key, leaf.cert.signature_hash_algorithm)
    )  # type: ignore[arg-type]
    duplicate = _patched(with_ian, b"\x06\x03\x55\x1d\x12", b"\x06\x03\x55\x1d\x11")
    unknown_key = _patched(
        leaf.cert, b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x01", b"\x06\x07\x2a\x86\x48\xce\x3d\x02\x09"
    )
    now = datetime.now(UTC)
    # When their facts are read
    dup_facts = cert_facts(duplicate, now)
    odd_key = cert_facts(unknown_key, now)
    # Then each becomes data: the unreadable part is recorded, the rest is still there
    assert dup_facts.sans == [] and any("extensions" in p for p in dup_facts.problems)
    assert dup_facts.subject == "CN=odd"
    assert (odd_key.key_type, odd_key.key_size) == ("unknown", 0)
    assert odd_key.sans == [SNI]


def test_chain_refused_for_a_reason_no_check_names_is_verification_failed(
    pki: Pki, tmp_path: Path
) -> None:
    # Given a leaf with a critical extension nobody understands (clients must refuse it)
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    leaf = pki.issue("critical", pki.inter, critical_extra=unknown)
    with TlsServer([leaf.cert, pki.inter.cert], leaf.key, tmp_path) as ep:
        report = check_endpoint(ep.address, ep.port, SNI, ca_bundle=pki.bundle, timeout_s=3.0)
    # Then cryptography's refusal is reported as such, with its reason
    assert [f.code for f in report.findings] == ["verification-failed"]
    assert report.handshake_ok and not report.verified


def test_check_endpoint_inside_the_target_namespace(pki: Pki, tmp_path: Path, scratch_net) -> None:  # type: ignore[no-untyped-def]
    # Given a TLS server listening on loopback inside a service's own namespace
    namespace = Target(netns=scratch_net.add("tls", 2))
    leaf = pki.issue("good", pki.inter)
    with TlsServer([leaf.cert, pki.inter.cert], leaf.key, tmp_path, inside=namespace) as ep:
        # When it is checked from the host, and through the target
        from_host = check_endpoint(ep.address, ep.port, SNI, ca_bundle=pki.bundle, timeout_s=1.0)
        inside = check_endpoint(
            ep.address, ep.port, SNI, ca_bundle=pki.bundle, timeout_s=1.0, target=namespace
        )
    # Then only the check made inside the namespace reaches it
    assert [f.code for f in from_host.findings] == ["handshake-failed"]
    assert inside.verified and inside.findings == []


def test_check_graph_walks_good_broken_and_silent_endpoints_at_once(
    pki: Pki, tmp_path: Path
) -> None:
    # Given a graph with a good chain, a chain missing its intermediate (the verifier
    # refuses it, so it is diagnosed off the walk's thread), and a port that accepts and
    # never answers
    good = pki.issue("good", pki.inter)
    lonely = pki.issue("lonely", pki.inter, sans=("lonely.zoo.test",))
    with (
        TlsServer([good.cert, pki.inter.cert], good.key, tmp_path) as by_sni,
        TlsServer([lonely.cert], lonely.key, tmp_path) as incomplete,
        socket.create_server(("127.0.0.1", 0)) as mute,
    ):
        mute_port = mute.getsockname()[1]
        graph = _graph(
            [
                (by_sni.address, by_sni.port, SNI, "sni"),
                (incomplete.address, incomplete.port, "lonely.zoo.test", "sni"),
                ("127.0.0.1", mute_port, "mute.zoo.test", "sni"),
            ]
        )
        # When the graph's TLS endpoints are checked with a 1 s timeout
        started = time.monotonic()
        checked = check_graph(graph, ca_bundle=pki.bundle, timeout_s=1.0)
        elapsed = time.monotonic() - started
    # Then each endpoint has its own finding, and the silent one held up nobody for longer
    # than its own timeout
    codes = {
        n.port: [f.code for f in n.tls.findings]
        for n in checked.nodes
        if isinstance(n, EndpointNode) and n.tls is not None
    }
    assert codes == {
        by_sni.port: [],
        incomplete.port: ["incomplete-chain"],
        mute_port: ["handshake-failed"],
    }
    assert elapsed < 2.0
