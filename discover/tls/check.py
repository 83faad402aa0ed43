"""Check TLS endpoints: one by address and port, or every TLS endpoint of a graph, concurrently.

A server's misbehaviour (no answer, garbage, a reset, a broken chain) always becomes a
finding in the ChainReport; only the caller's own mistakes (a bad CA bundle, a bad target
string, a missing namespace) raise.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder

from depdrill.discover.model import EndpointNode, Graph, NameNode, NamesEdge
from depdrill.discover.tls.aia import AiaError, fetch_issuers
from depdrill.discover.tls.diagnose import Code, Evidence, diagnose
from depdrill.discover.tls.facts import cert_facts
from depdrill.discover.tls.fetch import HandshakeFailed, Served, fetch_chain, fetch_chains
from depdrill.discover.tls.model import CertFacts, ChainReport, Finding, Severity
from depdrill.discover.tls.path import build_path, from_verified
from depdrill.discover.tls.trust import Trust, load_trust
from depdrill.errors import InputError
from depdrill.netns import Target

TLS_PORTS = frozenset({443, 465, 636, 853, 993, 995, 6443, 8443})
MAX_AIA_URLS = 3  # per missing issuer: bounded work for a hostile certificate
MAX_WORKERS = 64
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def parse_target(text: str, default_port: int = 443) -> tuple[str, int]:
    """ "host", "host:port", "1.2.3.4:443", "[::1]:443" -> (host, port); InputError otherwise."""
    text = text.strip()
    host, port_text = text, None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise InputError(f"bad target {text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise InputError(f"bad target {text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    port = default_port
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InputError(f"bad target {text!r}: port must be 1-65535")
        port = int(port_text)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    name = host.rstrip(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(p) for p in name.split(".")):
        raise InputError(f"bad target {text!r}: expected HOST[:PORT] or ADDRESS:PORT")
    return name.lower(), port


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _verify(
    leaf: x509.Certificate, others: list[x509.Certificate], trust: Trust, name: str, now: datetime
) -> tuple[list[x509.Certificate] | None, str | None]:
    """cryptography's own verdict: (path, None) or (None, its error message)."""
    subject: x509.GeneralName
    try:
        subject = (
            x509.IPAddress(ipaddress.ip_address(name)) if _is_address(name) else x509.DNSName(name)
        )
        verifier = PolicyBuilder().store(trust.store).time(now).build_server_verifier(subject)
        return list(verifier.verify(leaf, others)), None
    except Exception as exc:  # VerificationError, or ValueError for a name it cannot take
        return None, str(exc) or type(exc).__name__


@functools.lru_cache(maxsize=4096)
def _facts(cert: x509.Certificate, now: datetime) -> CertFacts:
    """Facts per certificate and instant: a graph walk shares `now`, so the intermediates and
    anchors that many endpoints have in common are read once."""
    return cert_facts(cert, now)


def _failed(address: str, port: int, sni: str | None, now: datetime, reason: str) -> ChainReport:
    finding = Finding(
        code=Code.HANDSHAKE_FAILED.value,
        severity=Severity.FAIL,
        message=f"no TLS handshake with {address}:{port}: {reason}",
    )
    return ChainReport(
        host=address, port=port, sni=sni, checked=now, handshake_ok=False, findings=[finding]
    )


def _report(
    address: str,
    port: int,
    sni: str | None,
    served: Served,
    trust: Trust,
    warn_days: int,
    timeout_s: float,
    target: Target | None,
    now: datetime,
    verified: tuple[list[x509.Certificate] | None, str | None] | None = None,
) -> ChainReport:
    chain = served.chain
    aia_deadline = time.monotonic() + timeout_s  # one budget for all AIA fetches of a chain

    def aia(cert: x509.Certificate) -> list[tuple[str, list[x509.Certificate]]]:
        found: list[tuple[str, list[x509.Certificate]]] = []
        for url in _facts(cert, now).ca_issuers[:MAX_AIA_URLS]:
            remaining = aia_deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(AiaError):
                found.append((url, fetch_issuers(url, timeout_s=remaining, target=target)))
        return found

    name = sni or address
    # The verifier's path when it accepts the chain; otherwise a walk by hand (with AIA)
    # that remembers where and why it stopped, which the verifier's message does not say.
    verified_path, verify_error = verified or _verify(chain[0], chain[1:], trust, name, now)
    if verified_path is not None:
        path = from_verified(chain, verified_path)
    else:
        path = build_path(chain, trust, aia)
        fetched = [
            c
            for c, i in zip(path.certs, path.served_index, strict=True)
            if i is None and not trust.contains(c)
        ]
        if fetched:
            verified_path, verify_error = _verify(
                chain[0], [*chain[1:], *fetched], trust, name, now
            )
    served_facts = [_facts(c, now) for c in chain]
    path_facts = [_facts(c, now) for c in path.certs]
    findings = diagnose(
        Evidence(
            served=chain,
            served_facts=served_facts,
            path=path,
            path_facts=path_facts,
            trust=trust,
            name=name,
            warn_days=warn_days,
            now=now,
            ocsp_staple=served.ocsp_staple,
            verify_error=verify_error,
        )
    )
    if verified_path is not None:
        built = [_facts(c, now) for c in verified_path]
    else:
        built = path_facts if path.anchored else []
    return ChainReport(
        host=address,
        port=port,
        sni=sni,
        checked=now,
        handshake_ok=True,
        protocol=served.protocol,
        cipher=served.cipher,
        served=served_facts,
        path=built,
        verified=verified_path is not None,
        stapled=served.stapled,
        aia_fetched=path.aia_urls,
        findings=findings,
        earliest_expiry_served=min(f.not_after for f in served_facts),
        earliest_expiry_path=min((f.not_after for f in built), default=None),
    )


@dataclass(frozen=True)
class _Walk:
    """What every endpoint of one check shares."""

    trust: Trust
    warn_days: int
    timeout_s: float
    target: Target | None
    now: datetime


def _sni_for(address: str, sni: str | None) -> str | None:
    return address if sni is None and not _is_address(address) else sni


def _analysed(
    address: str,
    port: int,
    sni: str | None,
    served: Served,
    walk: _Walk,
    verified: tuple[list[x509.Certificate] | None, str | None] | None = None,
) -> ChainReport:
    try:
        return _report(
            address, port, sni, served, walk.trust, walk.warn_days, walk.timeout_s,
            walk.target, walk.now, verified,
        )  # fmt: skip
    except Exception as exc:  # a certificate shape nobody foresaw: report it, never crash a walk
        report = _failed(address, port, sni, walk.now, "")
        finding = Finding(
            code=Code.VERIFICATION_FAILED.value,
            severity=Severity.FAIL,
            message=f"could not analyse the chain: {type(exc).__name__}: {exc}"[:400],
        )
        return report.model_copy(
            update={
                "handshake_ok": True,
                "findings": [finding],
                "protocol": served.protocol,
                "cipher": served.cipher,
            }
        )


def check_endpoint(
    address: str,
    port: int,
    sni: str | None,
    *,
    ca_bundle: Path | None = None,
    warn_days: int = 30,
    timeout_s: float = 5.0,
    target: Target | None = None,
    now: datetime | None = None,
) -> ChainReport:
    """Fetch, verify and diagnose one endpoint's chain. With no SNI given, a host name as
    address is sent as SNI; an IP address sends none and is matched against IP SANs."""
    walk = _Walk(load_trust(ca_bundle), warn_days, timeout_s, target, now or datetime.now(UTC))
    sni = _sni_for(address, sni)
    try:
        served = fetch_chain(address, port, sni, timeout_s=timeout_s, target=target)
    except HandshakeFailed as exc:
        return _failed(address, port, sni, walk.now, str(exc))
    return _analysed(address, port, sni, served, walk)


def _asked_names(graph: Graph) -> dict[tuple[str, int, str], set[str]]:
    """Per (address, port, proto): the names the service looked up to reach it."""
    asked: dict[tuple[str, int, str], set[str]] = {}
    for dep in graph.dependencies():
        for e in dep.endpoints:
            asked.setdefault((e.address, e.port, e.proto), set()).add(dep.name)
    return asked


def tls_endpoints(graph: Graph) -> list[tuple[EndpointNode, str | None]]:
    """Each TLS endpoint with the name a client would send as SNI (None if it has no name).

    TLS means: SNI was seen on it, or it is TCP on a well-known TLS port. The name is the
    one SNI showed, else the name the service looked up to reach it (sorted: deterministic).
    """
    names = {n.id: n.name for n in graph.nodes if isinstance(n, NameNode)}
    sni_names: dict[str, set[str]] = {}
    answer_names: dict[str, set[str]] = {}
    for edge in graph.links:
        if isinstance(edge, NamesEdge) and edge.target in names:
            into = sni_names if edge.via == "sni" else answer_names
            into.setdefault(edge.source, set()).add(names[edge.target])
    asked: dict[tuple[str, int, str], set[str]] | None = None  # built only if SNI is missing
    out: list[tuple[EndpointNode, str | None]] = []
    for node in graph.nodes:
        if not isinstance(node, EndpointNode) or node.proto != "tcp":
            continue
        if node.id not in sni_names and node.port not in TLS_PORTS:
            continue
        candidates = sni_names.get(node.id)
        if not candidates:
            if asked is None:
                asked = _asked_names(graph)
            candidates = (
                asked.get((node.address, node.port, node.proto))
                or answer_names.get(node.id)
                or set()
            )
        out.append((node, min(candidates) if candidates else None))
    return out


def check_graph(
    graph: Graph,
    *,
    ca_bundle: Path | None = None,
    warn_days: int = 30,
    timeout_s: float = 5.0,
    target: Target | None = None,
) -> Graph:
    """A copy of the graph with `tls` filled on every TLS endpoint, all checked at once."""
    # A bad bundle is the caller's error: raise it before any work.
    trust = load_trust(ca_bundle)
    todo = tls_endpoints(graph)
    if not todo:
        return graph
    walk = _Walk(trust, warn_days, timeout_s, target, datetime.now(UTC))
    endpoints = [(node.address, node.port, _sni_for(node.address, sni)) for node, sni in todo]
    reports: dict[int, ChainReport] = {}
    refused: list[tuple[int, Served, tuple[None, str | None]]] = []
    # Every handshake runs at once from this thread; a chain the verifier accepts is judged
    # as it arrives, while the other handshakes are still in flight (measured: threads per
    # endpoint spent more CPU passing the GIL around than on the handshakes themselves).
    fetched = fetch_chains(endpoints, timeout_s=timeout_s, target=target)
    with contextlib.closing(fetched):  # sockets still open are closed whatever happens
        for index, outcome in fetched:
            address, port, sni = endpoints[index]
            if isinstance(outcome, HandshakeFailed):
                reports[index] = _failed(address, port, sni, walk.now, str(outcome))
                continue
            chain = outcome.chain
            path, error = _verify(chain[0], chain[1:], trust, sni or address, walk.now)
            if path is not None:
                reports[index] = _analysed(address, port, sni, outcome, walk, (path, error))
            else:
                refused.append((index, outcome, (None, error)))
    # A refused chain may send its diagnosis to fetch issuers (AIA) over the network: those
    # wait in threads, so one slow CA server does not hold up the rest.
    if refused:
        with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(refused))) as pool:

            def judge(item: tuple[int, Served, tuple[None, str | None]]) -> ChainReport:
                index, served, verified = item
                address, port, sni = endpoints[index]
                return _analysed(address, port, sni, served, walk, verified)

            judged = pool.map(judge, refused)
            reports.update(zip((index for index, _, _ in refused), judged, strict=True))
    by_id = {node.id: reports[index] for index, (node, _) in enumerate(todo)}
    nodes = [n.model_copy(update={"tls": by_id[n.id]}) if n.id in by_id else n for n in graph.nodes]
    return graph.model_copy(update={"nodes": nodes})
