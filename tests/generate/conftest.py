"""A fixed dependency graph, built from the model classes, that every generate test reads."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from depdrill.discover.model import (
    AddressNode,
    AnswerEdge,
    CaptureStats,
    CnameEdge,
    ConnectsEdge,
    EndpointNode,
    Graph,
    NameNode,
    NamesEdge,
    QueriesEdge,
    ResolvedEdge,
    ResolverNode,
    ServiceNode,
    address_id,
    endpoint_id,
    name_id,
    resolver_id,
)
from depdrill.discover.tls.model import ChainReport
from depdrill.generate.model import HttpProbe
from depdrill.generate.planner import GenerateOptions
from depdrill.netns import Target

T0 = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=30)


def _chain(host: str, sni: str) -> ChainReport:
    return ChainReport(
        host=host,
        port=443,
        sni=sni,
        checked=T1,
        handshake_ok=True,
        earliest_expiry_served=datetime(2026, 12, 8, tzinfo=UTC),
    )


def build_graph(
    *, extra_answers: dict[str, list[str]] | None = None, drop: set[str] | None = None
) -> Graph:
    """The shop service: an HTTPS API behind a CNAME on two addresses (one tied by SNI), a
    redis cache, a UDP statsd sink, a name resolved but never used, an NXDOMAIN, an IPv6
    API, a hostile name, and a flow to an address no name resolved to.

    `extra_answers` adds addresses; `drop` leaves names out."""
    drop = drop or set()
    answers: dict[str, list[str]] = {
        "edge.payments.lab.test": ["198.18.0.10"],
        "cache.lab.test": ["198.18.0.20"],
        "statsd.lab.test": ["198.18.0.30"],
        "unused.lab.test": ["198.18.0.40"],
        "v6.lab.test": ["2001:db8::10"],
        "evil\nname lab.test": ["198.18.0.50"],
    }
    for name, extra in (extra_answers or {}).items():
        answers[name] = sorted({*answers.get(name, []), *extra})
    looked_up = {
        "api.payments.lab.test": 412,
        "cache.lab.test": 37,
        "statsd.lab.test": 5,
        "unused.lab.test": 2,
        "nx.lab.test": 9,
        "v6.lab.test": 4,
        "evil\nname lab.test": 1,
    }
    flows = {
        ("198.18.0.10", 443, "tcp"): 120,
        ("198.18.0.11", 443, "tcp"): 8,
        ("198.18.0.20", 6379, "tcp"): 40,
        ("198.18.0.30", 8125, "udp"): 300,
        ("2001:db8::10", 8443, "tcp"): 3,
        ("198.18.0.50", 80, "tcp"): 1,
        ("198.18.0.60", 9000, "tcp"): 2,  # a hard-coded address: no name, no SNI
    }
    nodes: list[object] = [
        ServiceNode(label="shop"),
        ResolverNode(id=resolver_id("198.18.0.2"), address="198.18.0.2"),
        ResolverNode(id=resolver_id("198.18.0.3"), address="198.18.0.3"),
    ]
    links: list[object] = [
        QueriesEdge(source="service", target=resolver_id("198.18.0.2"), count=400),
        QueriesEdge(source="service", target=resolver_id("198.18.0.3"), count=70),
    ]
    names = sorted({*looked_up, *answers, "edge.payments.lab.test"} - drop)
    nodes.extend(NameNode(id=name_id(n), name=n) for n in names)
    for name, count in sorted(looked_up.items()):
        if name in drop:
            continue
        rcodes = {"NXDOMAIN": count} if name == "nx.lab.test" else {"NOERROR": count}
        links.append(
            ResolvedEdge(
                source="service",
                target=name_id(name),
                count=count,
                qtypes=["A"],
                rcodes=rcodes,
                first_seen=T0,
                last_seen=T1,
            )
        )
    if "api.payments.lab.test" not in drop:
        links.append(
            CnameEdge(
                source=name_id("api.payments.lab.test"),
                target=name_id("edge.payments.lab.test"),
                ttl=60,
            )
        )
    addresses = sorted(
        {a for name, addrs in answers.items() if name not in drop for a in addrs}
        | {a for a, _, _ in flows}
    )
    for a in addresses:
        nodes.append(AddressNode(id=address_id(a), address=a, family=6 if ":" in a else 4))
    for name, addrs in sorted(answers.items()):
        if name in drop:
            continue
        for a in addrs:
            links.append(
                AnswerEdge(
                    source=name_id(name),
                    target=address_id(a),
                    rtype="AAAA" if ":" in a else "A",
                    ttl=300,
                )
            )
    for (a, port, proto), count in sorted(flows.items()):
        tls = None
        if a == "198.18.0.10":
            tls = _chain(a, "api.payments.lab.test")
        nodes.append(
            EndpointNode(id=endpoint_id(a, port, proto), address=a, port=port, proto=proto, tls=tls)
        )
        links.append(
            ConnectsEdge(
                source="service",
                target=endpoint_id(a, port, proto),
                count=count,
                first_seen=T0,
                last_seen=T1,
            )
        )
    if "api.payments.lab.test" not in drop:
        # 198.18.0.11 was never in an answer: a cached address, tied to the name by SNI.
        links.append(
            NamesEdge(
                source=endpoint_id("198.18.0.11", 443, "tcp"),
                target=name_id("api.payments.lab.test"),
                via="sni",
            )
        )
    return Graph(
        target="netns ddl-svc",
        target_spec=Target(netns="ddl-svc"),
        capture=CaptureStats(started=T0, ended=T1, packets=900, dns_messages=940, flows=6),
        nodes=nodes,  # type: ignore[arg-type]
        links=links,  # type: ignore[arg-type]
    )


@pytest.fixture
def graph() -> Graph:
    return build_graph()


@pytest.fixture
def options() -> GenerateOptions:
    return GenerateOptions(probes=[HttpProbe(url="http://198.18.0.100:8080/health")])


DATA = Path(__file__).parent / "data"


def check_golden(name: str, actual: str) -> None:
    """Compare with tests/generate/data/NAME, showing a unified diff on mismatch;
    DEPDRILL_UPDATE_GOLDEN=1 rewrites the file instead."""
    path = DATA / name
    if os.environ.get("DEPDRILL_UPDATE_GOLDEN") == "1":
        path.write_text(actual, encoding="utf-8")
        return
    expected = path.read_text(encoding="utf-8") if path.exists() else ""
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile=f"golden/{name}",
                tofile="generated",
            )
        )
        pytest.fail(
            f"{name} differs from its golden file (DEPDRILL_UPDATE_GOLDEN=1 rewrites):\n{diff}"
        )


@pytest.fixture
def golden() -> Callable[[str, str], None]:
    return check_golden


@pytest.fixture
def make_graph() -> Callable[..., Graph]:
    return build_graph
