"""What changed between two scans: dependencies added, gone or moved, certificates nearer expiry."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from depdrill.artifact import Frozen, read_text
from depdrill.discover.model import Graph
from depdrill.errors import InputError
from depdrill.generate.model import BlackholeFault, DnsBlackholeFault, LatencyFault, Suite
from depdrill.generate.suitefile import parse_suite

RESOLVERS = "(resolvers)"


class Footprint(Frozen):
    """Where a dependency was seen: its addresses and ports."""

    addresses: list[str] = []
    ports: list[int] = []


class Moved(Frozen):
    name: str
    before: Footprint
    after: Footprint


class NearerExpiry(Frozen):
    endpoint: str  # name:port
    before: datetime
    after: datetime


class Diff(Frozen):
    added: list[str] = []
    removed: list[str] = []
    moved: list[Moved] = []
    nearer_expiry: list[NearerExpiry] = []
    tests_added: list[str] = []
    tests_removed: list[str] = []

    @property
    def changed(self) -> bool:
        return bool(
            self.added
            or self.removed
            or self.moved
            or self.nearer_expiry
            or self.tests_added
            or self.tests_removed
        )

    def lines(self) -> list[str]:
        """One line per change, for a terminal or a CI log."""
        out = [f"+ {name}" for name in self.added]
        out += [f"- {name}" for name in self.removed]
        for m in self.moved:
            out.append(f"~ {m.name}: {_where(m.before)} -> {_where(m.after)}")
        for e in self.nearer_expiry:
            out.append(
                f"! {e.endpoint}: expires {e.after.date().isoformat()} "
                f"(was {e.before.date().isoformat()})"
            )
        out += [f"+ test {t}" for t in self.tests_added]
        out += [f"- test {t}" for t in self.tests_removed]
        return out


def _where(footprint: Footprint) -> str:
    ports = ",".join(str(p) for p in footprint.ports) or "-"
    return f"{' '.join(footprint.addresses) or 'no address'} port {ports}"


def _compare(before: dict[str, Footprint], after: dict[str, Footprint]) -> Diff:
    return Diff(
        added=sorted(after.keys() - before.keys()),
        removed=sorted(before.keys() - after.keys()),
        moved=[
            Moved(name=name, before=before[name], after=after[name])
            for name in sorted(before.keys() & after.keys())
            if before[name] != after[name]
        ],
    )


def _graph_footprints(graph: Graph) -> dict[str, Footprint]:
    out = {
        d.name: Footprint(
            addresses=sorted({*d.addresses, *(e.address for e in d.endpoints)}),
            ports=d.ports,
        )
        for d in graph.dependencies()
    }
    resolvers = graph.resolvers()
    if resolvers:
        out[RESOLVERS] = Footprint(
            addresses=sorted({r.address for r in resolvers}),
            ports=sorted({r.port for r in resolvers}),
        )
    return out


def _expiries(graph: Graph) -> dict[str, datetime]:
    out: dict[str, datetime] = {}
    for dep in graph.dependencies():
        for endpoint in dep.tls_endpoints:
            tls = endpoint.tls
            if tls is None or tls.earliest_expiry_served is None:
                continue
            key = f"{dep.name}:{endpoint.port}"
            expiry = tls.earliest_expiry_served
            out[key] = min(out.get(key, expiry), expiry)
    return out


def diff_graphs(old: Graph, new: Graph) -> Diff:
    """Dependencies added, gone or moved between two graphs, and certificates whose
    earliest expiry came nearer."""
    base = _compare(_graph_footprints(old), _graph_footprints(new))
    before, after = _expiries(old), _expiries(new)
    nearer = [
        NearerExpiry(endpoint=key, before=before[key], after=after[key])
        for key in sorted(before.keys() & after.keys())
        if after[key] < before[key]
    ]
    return base.model_copy(update={"nearer_expiry": nearer})


def _suite_footprints(suite: Suite) -> dict[str, Footprint]:
    addresses: dict[str, set[str]] = {}
    ports: dict[str, set[int]] = {}
    for test in suite.tests:
        fault = test.fault
        if isinstance(fault, DnsBlackholeFault):
            addresses.setdefault(RESOLVERS, set()).update(fault.resolvers)
            ports.setdefault(RESOLVERS, set()).add(53)
        elif isinstance(fault, BlackholeFault | LatencyFault) and test.dependency is not None:
            addresses.setdefault(test.dependency, set()).update(fault.addresses)
            ports.setdefault(test.dependency, set()).update(fault.ports)
        elif test.check is not None and test.dependency is not None:
            addresses.setdefault(test.dependency, set()).add(test.check.address)
            ports.setdefault(test.dependency, set()).add(test.check.port)
    return {
        name: Footprint(addresses=sorted(addresses[name]), ports=sorted(ports.get(name, set())))
        for name in addresses
    }


def diff_suites(old: Suite, new: Suite) -> Diff:
    """Dependencies and tests added, gone or moved between two suites."""
    base = _compare(_suite_footprints(old), _suite_footprints(new))
    old_ids, new_ids = {t.id for t in old.tests}, {t.id for t in new.tests}
    return base.model_copy(
        update={
            "tests_added": sorted(new_ids - old_ids),
            "tests_removed": sorted(old_ids - new_ids),
        }
    )


def diff_files(old: Path, new: Path) -> Diff:
    """Diff two graphs (graph.json) or two suites (suite.yaml), told apart by their schema."""
    before, after = _load(old), _load(new)
    if isinstance(before, Graph) and isinstance(after, Graph):
        return diff_graphs(before, after)
    if isinstance(before, Suite) and isinstance(after, Suite):
        return diff_suites(before, after)
    raise InputError(f"{old} and {new}: one is a graph, the other a suite; compare like with like")


def _load(path: Path) -> Graph | Suite:
    text = read_text(path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        raw = None
    if isinstance(raw, dict) and str(raw.get("schema", "")).startswith("depdrill.graph/"):
        return Graph.from_raw(raw, str(path))
    # Suites are compared, never run here: command probes may stay in them.
    return parse_suite(text, str(path), allow_commands=True)
