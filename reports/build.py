"""Build the ReportModel from a run's results (and its graph, and an earlier run)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from depdrill.artifact import utcnow
from depdrill.discover.model import Dependency, EndpointNode, Graph
from depdrill.discover.tls.model import ChainReport
from depdrill.execute.model import Results, TestResult, Verdict
from depdrill.generate.model import BlackholeFault, DnsBlackholeFault, Fault, LatencyFault
from depdrill.reports.blindspots import blind_spots
from depdrill.reports.changes import changes
from depdrill.reports.findings import findings
from depdrill.reports.model import (
    DependencyRow,
    ErrorCount,
    ReportModel,
    ScanInfo,
    TestRef,
    TestView,
    TlsSummary,
    TlsView,
    Worst,
)
from depdrill.reports.score import score
from depdrill.reports.text import anchor, describe_probe, duration, label_of, percent, visible

# Worst first: a dependency is drawn in the colour of the first of these its tests reached.
WORST_ORDER: list[Worst] = ["no-recovery", "failed", "degraded", "error", "tolerant", "skipped"]


def build(
    results: Results,
    graph: Graph | None,
    previous: Results | None = None,
    created: datetime | None = None,
) -> ReportModel:
    tls = tls_views(results, graph)
    spots = blind_spots(results, graph)
    rows = dependency_rows(results, graph, tls)
    return ReportModel(
        created=created or utcnow(),
        scan=scan_info(results, graph, previous),
        score=score(results.tests, tls, spots, graph is not None),
        findings=findings(results, tls, spots, graph),
        dependencies=rows,
        tests=[view_of(results, t) for t in results.tests],
        tls=tls,
        blind_spots=spots,
        changes=changes(previous, results) if previous is not None else None,
    )


TAPS = {
    "ebpf": "eBPF programs on the namespace's devices (tcx)",
    "nflog": "nft rules logging to an NFLOG group",
    "packet": "a packet socket",
}


def _fallback(why: str) -> str:
    """Why "auto" did not use the taps before the one it used, as the report says it."""
    if not why.startswith(("ebpf: ", "nflog: ")):  # a graph from before the ebpf tap
        why = f"nflog: {why}"
    parts = (part.partition(": ") for part in re.split(r"; (?=(?:ebpf|nflog): )", why))
    return "; ".join(f"{tap} could not be used: {reason}" for tap, _, reason in parts)


def scan_info(results: Results, graph: Graph | None, previous: Results | None) -> ScanInfo:
    service = results.suite.service
    slo = service.slo
    verdicts = Counter(t.verdict.value for t in results.tests)
    discovery = None
    if graph is not None:
        cap = graph.capture
        seconds = (cap.ended - cap.started).total_seconds()
        discovery = (
            f"{graph.target}: {seconds:.0f} s of capture from {cap.started:%Y-%m-%d %H:%M:%S} UTC, "
            f"{cap.packets} packets, {cap.dns_messages} DNS messages, {cap.flows} flows"
        )
        if cap.dns_folded:
            discovery += (
                f" ({cap.dns_folded} question and answer pairs repeated one seen in full and "
                "were counted in the kernel)"
            )
        tap = TAPS.get(cap.tap)
        if tap:
            why = f" ({_fallback(cap.tap_fallback)})" if cap.tap_fallback else ""
            discovery += f"; captured through {tap}{why}"
    return ScanInfo(
        service=service.name,
        target=service.target.describe(),
        probes=[describe_probe(p) for p in service.probes],
        slo=f"at least {percent(slo.success_ratio)} of probes succeed and p95 latency stays "
        f"under {duration(slo.p95_ms)}; below {percent(slo.down_ratio)} the service counts as down",
        started=results.started,
        ended=results.ended,
        host=results.host.hostname,
        kernel=results.host.kernel,
        latency_injector=results.host.latency_injector,
        producer=results.producer,
        halted=results.halted,
        verdicts={v.value: verdicts.get(v.value, 0) for v in Verdict},
        discovery=discovery,
        previous=previous.started if previous is not None else None,
    )


def fault_spec(fault: Fault) -> list[str]:
    """The fault as the suite asked for it, one line per part."""
    if isinstance(fault, DnsBlackholeFault):
        return [f"drop DNS (udp/53, tcp/53) to and from {', '.join(fault.resolvers)}"]
    ports = ", ".join(f"{p}" for p in fault.ports) or "every port"
    protos = "/".join(fault.protocols)
    lines = [f"addresses {', '.join(fault.addresses)}", f"{protos} on {ports}"]
    if isinstance(fault, BlackholeFault):
        return ["drop silently, both directions", *lines]
    assert isinstance(fault, LatencyFault)
    jitter = f" ± {fault.jitter_ms} ms" if fault.jitter_ms else ""
    return [f"delay {fault.delay_ms} ms{jitter} on the {fault.direction} path", *lines]


def view_of(results: Results, test: TestResult) -> TestView:
    spec = next((t for t in results.suite.tests if t.id == test.id), None)
    slo = spec.slo if spec is not None and spec.slo is not None else results.suite.service.slo
    errors = Counter(visible(s.error, 200) for s in test.samples if not s.ok and s.error)
    return TestView(
        id=test.id,
        anchor=anchor("test", test.id),
        kind=test.kind,
        label=label_of(spec, test.kind),
        dependency=test.dependency,
        verdict=test.verdict,
        rule=test.rule,
        reason=test.reason.value if test.reason is not None else None,
        fault_spec=fault_spec(spec.fault) if spec is not None and spec.fault is not None else [],
        budget=f"{percent(slo.success_ratio)} of probes succeed, p95 under {duration(slo.p95_ms)}",
        started=test.started,
        ended=test.ended,
        phases=test.phases,
        fault=test.fault,
        proof=test.proof,
        stats=test.stats,
        errors=[
            ErrorCount(error=e, count=c)
            for e, c in sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        ],
        samples=test.samples,
        tls_anchor=anchor("tls", _endpoint_key(test.tls)) if test.tls is not None else None,
    )


def _endpoint_key(report: ChainReport) -> str:
    return f"{report.host}:{report.port}"


def tls_views(results: Results, graph: Graph | None) -> list[TlsView]:
    """One view per TLS endpoint: a cert test's fresh report wins over discovery's."""
    reports: dict[str, ChainReport] = {}
    names: dict[str, set[str]] = {}
    if graph is not None:
        for node in graph.nodes:
            if isinstance(node, EndpointNode) and node.tls is not None:
                reports[_endpoint_key(node.tls)] = node.tls
        for dep in graph.dependencies():
            for endpoint in dep.tls_endpoints:
                assert endpoint.tls is not None
                names.setdefault(_endpoint_key(endpoint.tls), set()).add(dep.name)
    for test in results.tests:
        if test.tls is not None:
            key = _endpoint_key(test.tls)
            reports[key] = test.tls
            if test.dependency:
                names.setdefault(key, set()).add(test.dependency)
    views = []
    for key, report in sorted(reports.items()):
        shown = f"{report.sni or report.host}:{report.port}"
        views.append(
            TlsView(
                anchor=anchor("tls", key),
                endpoint=shown,
                dependencies=sorted(names.get(key, set())),
                report=report,
                findings=report.findings,
            )
        )
    return views


def _worst(tests: Sequence[TestRef]) -> Worst:
    present = {t.verdict.value for t in tests}
    return next((w for w in WORST_ORDER if w in present), "untested")


def _refs(results: Results, tests: Sequence[TestResult]) -> list[TestRef]:
    specs = {t.id: t for t in results.suite.tests}
    return [
        TestRef(
            id=t.id,
            anchor=anchor("test", t.id),
            label=label_of(specs.get(t.id), t.kind),
            verdict=t.verdict,
        )
        for t in tests
    ]


def _tls_summaries(views: Sequence[TlsView], name: str) -> list[TlsSummary]:
    out = []
    for view in views:
        if name not in view.dependencies:
            continue
        report = view.report
        expiry = report.earliest_expiry_served or report.earliest_expiry_path
        days = min((c.days_left for c in report.served), default=None)
        out.append(
            TlsSummary(
                anchor=view.anchor,
                worst=report.worst.value if report.worst is not None else None,
                earliest_expiry=expiry,
                days_left=days,
                verified=report.verified,
            )
        )
    return out


def _name_row(
    results: Results, dep: Dependency, tests: Sequence[TestResult], tls: Sequence[TlsView]
) -> DependencyRow:
    refs = _refs(results, tests)
    return DependencyRow(
        anchor=anchor("dep", dep.name),
        kind="name",
        name=dep.name,
        canonical=dep.canonical,
        cnames=dep.cnames,
        addresses=dep.addresses,
        endpoints=[f"{e.address}:{e.port}/{e.proto}" for e in dep.endpoints],
        queries=dep.queries,
        flows=sum(e.flows for e in dep.endpoints),
        tls=_tls_summaries(tls, dep.name),
        tests=refs,
        worst=_worst(refs),
    )


def _dependencies_from_suite(results: Results) -> list[Dependency]:
    """Without a graph, the suite's faults say which addresses and ports each name had."""
    found: dict[str, Dependency] = {}
    for test in results.suite.tests:
        fault = test.fault
        if test.dependency is None or not isinstance(fault, BlackholeFault | LatencyFault):
            continue
        known = found.get(test.dependency)
        addresses = sorted(set(fault.addresses) | set(known.addresses if known else []))
        found[test.dependency] = Dependency(
            name=test.dependency, canonical=test.dependency, addresses=addresses
        )
    for result in results.tests:
        if result.dependency and result.dependency not in found and result.kind != "dns-blackhole":
            found[result.dependency] = Dependency(
                name=result.dependency, canonical=result.dependency
            )
    return sorted(found.values(), key=lambda d: d.name)


def dependency_rows(
    results: Results, graph: Graph | None, tls: Sequence[TlsView]
) -> list[DependencyRow]:
    deps = graph.dependencies() if graph is not None else _dependencies_from_suite(results)
    known = {d.name for d in deps}
    for name in sorted({t.dependency for t in results.tests if t.dependency} - known):
        if any(t.dependency == name and t.kind != "dns-blackhole" for t in results.tests):
            deps.append(Dependency(name=name, canonical=name))
    rows = []
    for dep in deps:
        own = {dep.name, dep.canonical}
        tests = [t for t in results.tests if t.dependency in own and t.kind != "dns-blackhole"]
        rows.append(_name_row(results, dep, tests, tls))
    rows.extend(_resolver_rows(results, graph))
    return rows


def _resolver_rows(results: Results, graph: Graph | None) -> list[DependencyRow]:
    dns_tests = [t for t in results.tests if t.kind == "dns-blackhole"]
    resolvers: list[tuple[str, int, int]] = []  # address, port, queries
    if graph is not None:
        queries = {e.target: e.count for e in graph.links if e.kind == "queries"}
        resolvers = [(r.address, r.port, queries.get(r.id, 0)) for r in graph.resolvers()]
    else:
        for spec in results.suite.tests:
            if isinstance(spec.fault, DnsBlackholeFault):
                resolvers.extend((a, 53, 0) for a in spec.fault.resolvers)
        resolvers = sorted(set(resolvers))
    rows = []
    for address, port, count in resolvers:
        tests = [
            t
            for t in dns_tests
            if t.fault is None or address in t.fault.addresses or len(resolvers) == 1
        ]
        refs = _refs(results, tests)
        rows.append(
            DependencyRow(
                anchor=anchor("dep", f"resolver {address}:{port}"),
                kind="resolver",
                name=f"DNS resolver {address}",
                canonical=f"{address}:{port}",
                addresses=[address],
                endpoints=[f"{address}:{port}/udp"],
                queries=count,
                tests=refs,
                worst=_worst(refs),
            )
        )
    return rows
