"""The planner: from a dependency graph to a suite of fault tests, deterministically."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationError

from depdrill.artifact import Frozen, describe_validation_error
from depdrill.discover.model import (
    Dependency,
    Endpoint,
    EndpointNode,
    Graph,
    NamesEdge,
    QueriesEdge,
    ServiceNode,
    endpoint_id,
    name_id,
)
from depdrill.errors import InputError
from depdrill.generate.model import (
    BlackholeFault,
    CertCheck,
    Defaults,
    DnsBlackholeFault,
    HttpProbe,
    LatencyFault,
    Probe,
    Proto,
    Selection,
    ServiceSpec,
    Slo,
    Suite,
    SuiteTest,
    Timing,
)
from depdrill.netns import Target

# Only names of this shape become test ids: a DNS name is attacker-chosen text, and an id
# with spaces, colons or control characters would break ids, comments and globs.
_SAFE_NAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_.])?$")
_LATENCY_STEP = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")


def _ladder(steps: list[int]) -> list[int]:
    if not steps:
        return steps
    if any(s < 1 or s > 60_000 for s in steps):
        raise ValueError("latency steps are 1 ms to 60 s")
    return sorted(set(steps))


class GenerateOptions(Frozen):
    """What to generate: the service's probes and thresholds, the ladder, which dependencies."""

    service_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    target: Target | None = None
    probes: list[Probe] = []
    slo: Slo = Slo()
    timing: Timing = Timing()
    latency_ms: Annotated[list[int], AfterValidator(_ladder)] = [100, 1000]
    jitter_ms: Annotated[int, Field(ge=0, le=60_000)] = 0
    include: list[str] = []
    exclude: list[str] = []
    warn_days: Annotated[int, Field(ge=0, le=3650)] = 30
    ca_bundle: str | None = None
    # The suite's `created`: pinned by the caller, else the end of the graph's capture, so
    # the same graph always gives the same bytes.
    created: datetime | None = None


def parse_latency(text: str) -> list[int]:
    """`100ms,1s` -> [100, 1000]; a bare number is milliseconds."""
    steps: list[int] = []
    for part in text.split(","):
        if not part.strip():
            continue
        match = _LATENCY_STEP.match(part)
        if match is None:
            raise InputError(f"latency step {part.strip()!r}: write it as 100ms or 1s")
        value = float(match.group(1)) * (1000 if match.group(2) == "s" else 1)
        if value != int(value) or not 1 <= value <= 60_000:
            raise InputError(f"latency step {part.strip()!r}: a whole number of ms, 1 ms to 60 s")
        steps.append(int(value))
    return sorted(set(steps))


def options_from_cli(
    *,
    probes: Sequence[str] = (),
    service_name: str | None = None,
    latency: str | None = None,
    jitter_ms: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    p95_ms: float | None = None,
    success_ratio: float | None = None,
    observe_s: float | None = None,
    ca_bundle: str | None = None,
    warn_days: int | None = None,
    target: Target | None = None,
    slo: Slo | None = None,
    timing: Timing | None = None,
    previous: Suite | None = None,
) -> GenerateOptions:
    """Options from command-line values. With `previous`, what is not given on the command
    line comes from that suite, so a regeneration keeps the thresholds a person set and
    chooses tests the same way (ladder, jitter, include/exclude)."""
    chosen = previous.defaults.selection if previous is not None else None
    chosen = chosen or Selection()
    base_slo = slo or (previous.service.slo if previous else Slo())
    slo_changes = {
        k: v for k, v in {"p95_ms": p95_ms, "success_ratio": success_ratio}.items() if v is not None
    }
    base_timing = timing or (previous.defaults.timing if previous else Timing())
    timing_changes = {"observe_s": observe_s} if observe_s is not None else {}
    fields: dict[str, object] = {
        "service_name": service_name or (previous.service.name if previous else None),
        "target": target or (previous.service.target if previous else None),
        "probes": [_http_probe(url) for url in probes]
        or (list(previous.service.probes) if previous else []),
        "slo": base_slo.model_copy(update=slo_changes),
        "timing": base_timing.model_copy(update=timing_changes),
        "include": list(include) or chosen.include,
        "exclude": list(exclude) or chosen.exclude,
        "latency_ms": parse_latency(latency) if latency is not None else chosen.latency_ms,
        "jitter_ms": jitter_ms if jitter_ms is not None else chosen.jitter_ms,
        "ca_bundle": ca_bundle or (previous.defaults.ca_bundle if previous else None),
    }
    if warn_days is not None:
        fields["warn_days"] = warn_days
    elif previous is not None:
        fields["warn_days"] = previous.defaults.warn_days
    try:
        options = GenerateOptions.model_validate(fields)
        # model_copy skips validation: check the thresholds once more as a whole
        Slo.model_validate(options.slo.model_dump())
        Timing.model_validate(options.timing.model_dump())
    except ValidationError as exc:
        raise InputError(f"generate options: {describe_validation_error(exc)}") from None
    return options


def _http_probe(url: str) -> HttpProbe:
    try:
        return HttpProbe(url=url)
    except ValidationError:
        raise InputError(f"probe {url!r}: not an http:// or https:// URL") from None


def run(graph: Graph, options: GenerateOptions) -> Suite:
    """The suite for a graph: a blackhole test and a latency ladder per reached dependency,
    a resolver blackhole, and a certificate check per TLS endpoint."""
    if not options.probes:
        raise InputError("give a probe, e.g. --probe http://SERVICE:PORT/health")
    target = options.target or graph.target_spec
    if target is None:
        raise InputError(
            f"the graph ({graph.target}) names no namespace or process: give --netns or --pid"
        )
    service = next((n for n in graph.nodes if isinstance(n, ServiceNode)), None)
    name = options.service_name or (service.label if service is not None else None)
    if not name:
        raise InputError("the graph names no service: give --service NAME")

    sni_names = _sni_names(graph)
    tests: list[SuiteTest] = []
    notes: list[str] = []
    for dep in graph.dependencies():
        if not _SAFE_NAME.match(dep.name):
            notes.append(
                f"{_printable(dep.name)}: not a plain DNS name; no tests (it would not make a "
                "safe test id)"
            )
            continue
        if not _selected(dep.name, options):
            notes.append(f"{dep.name}: left out by --include/--exclude")
            continue
        if not dep.reached:
            what = "resolved to nothing" if not dep.addresses else "resolved but never reached"
            notes.append(f"{dep.name}: {what} during discovery; no fault tests (nothing to break)")
            continue
        tests.extend(_dependency_tests(dep, sni_names, options, notes))
    tests.extend(_resolver_tests(graph, notes))
    notes.extend(_unnamed_flows(graph))

    return Suite(
        created=options.created or graph.capture.ended,
        service=ServiceSpec(name=name, target=target, probes=options.probes, slo=options.slo),
        defaults=Defaults(
            timing=options.timing,
            warn_days=options.warn_days,
            ca_bundle=options.ca_bundle,
            selection=Selection(
                latency_ms=options.latency_ms,
                jitter_ms=options.jitter_ms,
                include=options.include,
                exclude=options.exclude,
            ),
        ),
        tests=sorted(tests, key=lambda t: order_key(t.id)),
        notes=sorted(notes),
    )


def order_key(test_id: str) -> tuple[object, ...]:
    """Sort key for ids: by kind, then dependency, with numbers compared as numbers
    (latency-100ms before latency-1000ms)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", test_id))


def _selected(name: str, options: GenerateOptions) -> bool:
    if options.include and not any(fnmatch.fnmatchcase(name, g) for g in options.include):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in options.exclude)


def _printable(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")[:80]


def _sni_names(graph: Graph) -> dict[str, set[str]]:
    """endpoint id -> names a TLS ClientHello sent to that endpoint asked for."""
    names: dict[str, set[str]] = {}
    for edge in graph.links:
        if isinstance(edge, NamesEdge) and edge.via == "sni":
            names.setdefault(edge.source, set()).add(edge.target)
    return names


def _plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count} {word if count == 1 else (words or word + 's')}"


def _ports_text(endpoints: Iterable[Endpoint]) -> str:
    by_proto: dict[str, set[int]] = {}
    for e in endpoints:
        by_proto.setdefault(e.proto, set()).add(e.port)
    parts = []
    for proto in sorted(by_proto):
        ports = sorted(by_proto[proto])
        word = "port" if len(ports) == 1 else "ports"
        parts.append(f"{word} {', '.join(str(p) for p in ports)}/{proto}")
    return "; ".join(parts)


def _dependency_tests(
    dep: Dependency, sni_names: dict[str, set[str]], options: GenerateOptions, notes: list[str]
) -> list[SuiteTest]:
    names = {name_id(dep.name), *(name_id(c) for c in dep.cnames)}
    tls_endpoints = [
        e
        for e in dep.endpoints
        if e.proto == "tcp"
        and (
            e.tls is not None
            or sni_names.get(endpoint_id(e.address, e.port, e.proto), set()) & names
        )
    ]
    addresses = sorted({*dep.addresses, *(e.address for e in dep.endpoints)}, key=_address_key)
    flows = sum(e.flows for e in dep.endpoints)
    why = ", ".join(
        [
            f"seen {_plural(dep.queries, 'query', 'queries')}",
            _plural(len(addresses), "address", "addresses"),
            _ports_text(dep.endpoints),
            _plural(flows, "flow"),
            *(["TLS"] if tls_endpoints else []),
            *([f"via CNAME {' -> '.join(dep.cnames)}"] if dep.cnames else []),
        ]
    )
    ports = sorted({e.port for e in dep.endpoints})
    protocols: list[Proto] = sorted({e.proto for e in dep.endpoints})
    tests = [
        SuiteTest(
            id=f"blackhole:{dep.name}",
            dependency=dep.name,
            why=why,
            fault=BlackholeFault(addresses=addresses, ports=ports, protocols=protocols),
        )
    ]
    tcp = [e for e in dep.endpoints if e.proto == "tcp"]
    if not tcp:
        notes.append(
            f"{dep.name}: reached over UDP only; no latency tests (a fire-and-forget flow has "
            "no receive path to delay)"
        )
    elif options.latency_ms:
        tcp_ports = sorted({e.port for e in tcp})
        for delay in options.latency_ms:
            tests.append(
                SuiteTest(
                    id=f"latency-{delay}ms:{dep.name}",
                    dependency=dep.name,
                    why=why,
                    fault=LatencyFault(
                        addresses=addresses,
                        ports=tcp_ports,
                        protocols=["tcp"],
                        delay_ms=delay,
                        jitter_ms=options.jitter_ms,
                        direction="receive",
                    ),
                )
            )
    tests.extend(_cert_tests(dep, tls_endpoints))
    return tests


def _cert_tests(dep: Dependency, tls_endpoints: list[Endpoint]) -> list[SuiteTest]:
    by_port: dict[int, list[Endpoint]] = {}
    for e in tls_endpoints:
        by_port.setdefault(e.port, []).append(e)
    tests = []
    for port, endpoints in sorted(by_port.items()):
        endpoints.sort(key=lambda e: _address_key(e.address))
        first = endpoints[0]
        sni = first.tls.sni if first.tls is not None and first.tls.sni else dep.name
        why = f"TLS seen on {_plural(len(endpoints), 'address', 'addresses')}"
        why += f", port {port}, SNI {sni}"
        expiries = [
            e.tls.earliest_expiry_served
            for e in endpoints
            if e.tls is not None and e.tls.earliest_expiry_served is not None
        ]
        if expiries:
            why += f", earliest expiry {min(expiries).date().isoformat()}"
        tests.append(
            SuiteTest(
                id=f"cert:{dep.name}:{port}",
                dependency=dep.name,
                why=why,
                check=CertCheck(address=first.address, port=port, sni=sni),
            )
        )
    return tests


def _resolver_tests(graph: Graph, notes: list[str]) -> list[SuiteTest]:
    resolvers = graph.resolvers()
    plain = [r for r in resolvers if r.transport == "dns"]
    for r in resolvers:
        if r.transport != "dns":
            notes.append(
                f"resolver {r.address}:{r.port} speaks {r.transport.upper()}; "
                "the port 53 blackhole does not cover it"
            )
    if not plain:
        notes.append("no plain DNS resolver seen; no resolver test")
        return []
    queries = {e.target: e.count for e in graph.links if isinstance(e, QueriesEdge)}
    total = sum(queries.get(r.id, 0) for r in plain)
    addresses = sorted({r.address for r in plain}, key=_address_key)
    why = (
        f"seen {_plural(total, 'query', 'queries')} to "
        f"{_plural(len(addresses), 'resolver')} ({', '.join(addresses)})"
    )
    return [
        SuiteTest(
            id="dns:resolver",
            why=why,
            fault=DnsBlackholeFault(resolvers=addresses),
        )
    ]


def _unnamed_flows(graph: Graph) -> list[str]:
    """Endpoints the service reached that no dependency accounts for: no name to test by."""
    covered = {
        endpoint_id(e.address, e.port, e.proto) for d in graph.dependencies() for e in d.endpoints
    }
    unnamed = sorted(
        (n for n in graph.nodes if isinstance(n, EndpointNode) and n.id not in covered),
        key=lambda n: (_address_key(n.address), n.port, n.proto),
    )
    if not unnamed:
        return []
    shown = ", ".join(f"{n.address}:{n.port}/{n.proto}" for n in unnamed[:5])
    more = f" and {len(unnamed) - 5} more" if len(unnamed) > 5 else ""
    return [
        f"{_plural(len(unnamed), 'connection')} to addresses no name resolved to ({shown}{more}): "
        "no tests (a fault needs a dependency's name to follow)"
    ]


def _address_key(address: str) -> tuple[int, str]:
    # IPv4 before IPv6, then numerically within a family (10 after 9).
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (9, address)
    return (ip.version, f"{int(ip):040d}")


def regenerate(graph: Graph, old: Suite, options: GenerateOptions) -> Suite:
    """A new suite for the graph that keeps what a person edited in the old one.

    Per test the person's `skip`, `note` and `slo` carry over; the service and defaults come
    from `options` (build them with `options_from_cli(previous=old)` to keep the old
    thresholds). A test whose dependency is gone stays, marked `removed`, only if a person
    edited it; otherwise it goes with the dependency.
    """
    fresh = run(graph, options)
    before = {t.id: t for t in old.tests}
    tests: list[SuiteTest] = []
    for test in fresh.tests:
        kept = before.get(test.id)
        if kept is None:
            tests.append(test)
        else:
            tests.append(test.model_copy(update=_edits(kept)))
    present = {t.id for t in fresh.tests}
    notes = list(fresh.notes)
    for test in old.tests:
        if test.id in present:
            continue
        if test.skip or test.note or test.slo is not None:
            tests.append(test.model_copy(update={"removed": True}))
            notes.append(f"{test.id}: not generated from this graph; kept because it was edited")
    return fresh.model_copy(
        update={"tests": sorted(tests, key=lambda t: order_key(t.id)), "notes": sorted(notes)}
    )


def _edits(test: SuiteTest) -> dict[str, object]:
    return {"skip": test.skip, "note": test.note, "slo": test.slo, "removed": False}
