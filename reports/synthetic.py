"""A synthetic run (results and graph) shaped like the lab's, for tests, the benchmark and
previews of the page without a lab: real model objects, realistic probe samples."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from depdrill.discover.model import (
    AddressNode,
    AnswerEdge,
    BlindSpot,
    BlindSpotCode,
    CaptureStats,
    CnameEdge,
    ConnectsEdge,
    Edge,
    EndpointNode,
    Graph,
    NameNode,
    NamesEdge,
    Node,
    QueriesEdge,
    ResolvedEdge,
    ResolverNode,
    ServiceNode,
    address_id,
    endpoint_id,
    name_id,
    resolver_id,
)
from depdrill.discover.tls.model import CertFacts, ChainReport, Finding, Severity
from depdrill.execute.model import (
    AppliedFault,
    Check,
    HostFacts,
    Phase,
    PhaseName,
    Proof,
    Results,
    Sample,
    Stats,
    TestResult,
    Verdict,
)
from depdrill.generate.model import (
    BlackholeFault,
    CertCheck,
    DnsBlackholeFault,
    HttpProbe,
    LatencyFault,
    ServiceSpec,
    Slo,
    Suite,
    SuiteTest,
)
from depdrill.netns import Target

START = datetime(2026, 11, 27, 2, 0, 0, tzinfo=UTC)
RESOLVER = "198.18.0.2"
SLO = Slo(success_ratio=0.95, p95_ms=800.0, down_ratio=0.5)
PROBE = HttpProbe(url="http://198.18.0.20:8080/health", timeout_s=5.0)
# Phase boundaries of one test, in seconds since it started.
PHASES: list[tuple[PhaseName, float, float]] = [
    ("preflight", 0.0, 0.05),
    ("baseline", 0.05, 2.05),
    ("apply", 2.05, 2.1),
    ("verify", 2.1, 2.4),
    ("observe", 2.4, 10.4),
    ("revert", 10.4, 10.45),
    ("recovery", 10.45, 20.45),
]


@dataclass(frozen=True)
class Behaviour:
    """How the synthetic service treats one dependency under each fault."""

    name: str
    address: str
    port: int
    proto: str = "tcp"
    blackhole: str = "tolerant"  # tolerant | hang | fail-fast | slow | no-recovery
    timeout_ms: float | None = None  # the service's own timeout on calls to it, if any
    tls_days_left: float | None = None  # a TLS endpoint's leaf days left
    cname: str | None = None


LAB_LIKE = [
    Behaviour("payments.lab.test", "198.18.0.10", 443, blackhole="hang", tls_days_left=300),
    Behaviour(
        "recommend.lab.test",
        "198.18.0.11",
        443,
        timeout_ms=250,
        tls_days_left=9,
        cname="reco-eu.lab.test",
    ),
    Behaviour("cache.lab.test", "198.18.0.12", 6379, timeout_ms=100),
    Behaviour("metrics.lab.test", "198.18.0.13", 8125, proto="udp", timeout_ms=0),
]


def many(count: int) -> list[Behaviour]:
    """`count` dependencies with a spread of behaviours, for size and speed checks."""
    kinds = ["tolerant", "hang", "tolerant", "fail-fast", "slow", "tolerant", "no-recovery"]
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        out.append(
            Behaviour(
                name=f"dep-{i:02d}.svc.test",
                address=f"198.18.{1 + i // 200}.{10 + i % 200}",
                port=443 if i % 3 == 0 else 8000 + i,
                blackhole=kind,
                timeout_ms=None if kind in {"hang", "no-recovery"} else 200.0,
                tls_days_left=(5.0 + 40 * (i % 5)) if i % 3 == 0 else None,
                cname=f"edge-{i:02d}.cdn.test" if i % 4 == 0 else None,
            )
        )
    return out


def _id_part(name: str) -> str:
    """A name as it may appear in a test id (no whitespace or colons)."""
    return re.sub(r"[\s:]", "-", name)[:253]


def _phase_of(t: float) -> PhaseName:
    return next((name for name, a, b in PHASES if a <= t < b), "recovery")


def _samples(
    rng: random.Random,
    base_ms: float,
    faulted: tuple[bool, float | None, str | None],
    recovers: bool = True,
) -> list[Sample]:
    """Probe samples every 0.25 s; under the fault each is ok with `latency` or fails."""
    ok_under, latency_under, error_under = faulted
    out = []
    t = 0.1
    while t < PHASES[-1][2]:
        phase = _phase_of(t)
        if phase in {"verify", "observe"} or (phase == "recovery" and not recovers):
            if ok_under:
                assert latency_under is not None
                out.append(
                    Sample(
                        t=t,
                        phase=phase,
                        ok=True,
                        latency_ms=round(latency_under * rng.uniform(0.95, 1.1), 1),
                    )
                )
            else:
                out.append(
                    Sample(t=t, phase=phase, ok=False, latency_ms=latency_under, error=error_under)
                )
        else:
            out.append(
                Sample(
                    t=t, phase=phase, ok=True, latency_ms=round(base_ms * rng.uniform(0.8, 1.6), 1)
                )
            )
        t = round(t + 0.25, 3)
    return out


def _stats(samples: list[Sample], phase: str) -> Stats:
    mine = [s for s in samples if s.phase == phase]
    oks = sorted(s.latency_ms for s in mine if s.ok and s.latency_ms is not None)

    def pct(p: float) -> float | None:
        return oks[min(len(oks) - 1, int(p * len(oks)))] if oks else None

    return Stats(
        samples=len(mine),
        ok=len(oks),
        success_ratio=len(oks) / len(mine) if mine else 0.0,
        p50_ms=pct(0.5),
        p95_ms=pct(0.95),
        max_ms=oks[-1] if oks else None,
    )


def _outcome(
    b: Behaviour, kind: str, delay: int
) -> tuple[Verdict, tuple[bool, float | None, str | None], bool, str]:
    """Verdict, how probes fare under the fault, whether it recovers, the deciding rule."""
    base = 12.0
    if kind == "blackhole":
        if b.blackhole == "hang":
            return (
                Verdict.FAILED,
                (False, None, "timed out"),
                True,
                "success ratio 0% under the fault is below the 50% down threshold",
            )
        if b.blackhole == "no-recovery":
            return (
                Verdict.NO_RECOVERY,
                (False, None, "timed out"),
                False,
                "success ratio 0% in recovery is below the 95% SLO after revert",
            )
        if b.blackhole == "fail-fast":
            return (
                Verdict.FAILED,
                (False, 35.0, "HTTP 503"),
                True,
                "success ratio 0% under the fault is below the 50% down threshold",
            )
        if b.blackhole == "slow":
            return (
                Verdict.DEGRADED,
                (True, 1400.0, None),
                True,
                "p95 1.5 s under the fault is above the 800 ms budget; recovered",
            )
        return (
            Verdict.TOLERANT,
            (True, base + (b.timeout_ms or 0), None),
            True,
            "success ratio 100% and p95 within the 800 ms budget under the fault",
        )
    waited = delay if b.timeout_ms is None else min(delay, b.timeout_ms)
    latency = base + waited
    if latency * 1.1 > SLO.p95_ms:
        return (
            Verdict.DEGRADED,
            (True, latency, None),
            True,
            f"p95 {latency * 1.1 / 1000:.1f} s under the fault is above the 800 ms budget; "
            "recovered",
        )
    return (
        Verdict.TOLERANT,
        (True, latency, None),
        True,
        "success ratio 100% and p95 within the 800 ms budget under the fault",
    )


def _cert(
    subject: str,
    issuer: str,
    days: float,
    index: int,
    is_ca: bool = False,
    sans: list[str] | None = None,
) -> CertFacts:
    not_after = START + timedelta(days=days)
    return CertFacts(
        subject=subject,
        issuer=issuer,
        serial=f"{0x1000 + index:x}",
        not_before=not_after - timedelta(days=365 if not is_ca else 3650),
        not_after=not_after,
        days_left=days,
        key_type="EC",
        key_size=256,
        signature_algorithm="ecdsa-with-SHA256",
        sans=sans or [],
        is_ca=is_ca,
        self_issued=subject == issuer,
        ca_issuers=["http://ca.lab.test/intermediate.crt"] if not is_ca else [],
        fingerprint_sha256=f"{index:02x}" * 32,
        pem="",
    )


def chain_report(
    host: str, address: str, port: int, days_left: float, warn_days: int = 30
) -> ChainReport:
    leaf = _cert(f"CN={host}", "CN=Lab Intermediate CA", days_left, 1, sans=[host])
    inter = _cert("CN=Lab Intermediate CA", "CN=Lab Root CA", 1500, 2, is_ca=True)
    root = _cert("CN=Lab Root CA", "CN=Lab Root CA", 3000, 3, is_ca=True)
    findings = []
    if days_left < warn_days:
        findings.append(
            Finding(
                code="expiring-soon",
                severity=Severity.WARN,
                certificate=0,
                message=f"certificate CN={host} expires in {int(days_left)} days "
                f"(warning window {warn_days} days)",
            )
        )
    return ChainReport(
        host=address,
        port=port,
        sni=host,
        checked=START,
        handshake_ok=True,
        protocol="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        served=[leaf, inter],
        path=[leaf, inter, root],
        verified=True,
        findings=findings,
        earliest_expiry_served=leaf.not_after,
        earliest_expiry_path=leaf.not_after,
    )


def synthetic_run(
    behaviours: list[Behaviour] | None = None,
    latencies: tuple[int, ...] = (100, 1000),
    seed: int = 7,
    service: str = "lab demo service",
) -> tuple[Results, Graph]:
    """Results and the graph they came from, for these dependencies (the lab's by default)."""
    deps = LAB_LIKE if behaviours is None else behaviours
    rng = random.Random(seed)
    suite_tests: list[SuiteTest] = []
    results: list[TestResult] = []
    clock = START + timedelta(seconds=30)

    def add(
        spec: SuiteTest,
        verdict: Verdict,
        rule: str,
        samples: list[Sample],
        fault: AppliedFault | None,
        tls: ChainReport | None = None,
    ) -> None:
        nonlocal clock
        suite_tests.append(spec)
        ended = clock + timedelta(seconds=PHASES[-1][2] if samples else 0.3)
        proof = None
        if fault is not None:
            what = f"tcp connect {fault.addresses[0]}"
            proof = Proof(
                effective=True,
                target=[
                    Check(
                        what=what,
                        expected="timeout" if spec.kind != "latency" else "slower by >= 80 ms",
                        observed="timed out after 1.0 s"
                        if spec.kind != "latency"
                        else "slower by 1003 ms",
                        ok=True,
                    )
                ],
                control=[
                    Check(
                        what=f"tcp connect {RESOLVER}:53",
                        expected="connects",
                        observed="connected in 0.3 ms",
                        ok=True,
                    )
                ],
            )
        results.append(
            TestResult(
                id=spec.id,
                kind=spec.kind,
                dependency=spec.dependency,
                verdict=verdict,
                rule=rule,
                started=clock,
                ended=ended,
                phases=[Phase(name=n, started=a, ended=b) for n, a, b in PHASES] if samples else [],
                fault=fault,
                proof=proof,
                samples=samples,
                stats={p: _stats(samples, p) for p in ("baseline", "observe", "recovery")}
                if samples
                else {},
                tls=tls,
            )
        )
        clock = ended + timedelta(seconds=1)

    for b in deps:
        proto = "udp" if b.proto == "udp" else "tcp"
        ports = [b.port]
        blackhole = BlackholeFault(addresses=[b.address], ports=ports, protocols=[proto])
        spec = SuiteTest(
            id=f"blackhole:{_id_part(b.name)}",
            dependency=b.name,
            fault=blackhole,
            why=f"seen {40 + len(b.name)} queries",
        )
        verdict, under, recovers, rule = _outcome(b, "blackhole", 0)
        applied = AppliedFault(
            injector="nft-blackhole",
            namespace="ddl-svc",
            addresses=[b.address],
            rules=[
                f"table netdev depdrill_bh {{ flags owner; set targets {{ type ipv4_addr; "
                f"flags timeout; elements = {{ {b.address} timeout 120s }} }} }}",
                f"add rule netdev depdrill_bh ingress ip saddr @targets {proto} "
                f"sport {b.port} drop",
                f"add rule netdev depdrill_bh egress ip daddr @targets {proto} dport {b.port} drop",
            ],
            apply_ms=3.2,
            revert_ms=1.4,
            reverted=True,
            deadline=clock + timedelta(seconds=120),
        )
        add(spec, verdict, rule, _samples(rng, 12.0, under, recovers), applied)
        for delay in latencies:
            fault = LatencyFault(
                addresses=[b.address], ports=ports, protocols=[proto], delay_ms=delay
            )
            spec = SuiteTest(
                id=f"latency-{delay}ms:{_id_part(b.name)}", dependency=b.name, fault=fault
            )
            verdict, under, recovers, rule = _outcome(b, "latency", delay)
            applied = AppliedFault(
                injector="nfqueue-latency",
                namespace="ddl-svc",
                addresses=[b.address],
                rules=[
                    f"iptables-legacy -t mangle -A PREROUTING -s {b.address} -p {proto} "
                    f"--sport {b.port} -m comment --comment depdrill -j NFQUEUE "
                    f"--queue-num 4242 --queue-bypass",
                    f"delay {delay} ms in user space",
                ],
                apply_ms=8.0,
                revert_ms=2.5,
                reverted=True,
            )
            add(spec, verdict, rule, _samples(rng, 12.0, under, recovers), applied)
    dns = SuiteTest(id="dns-blackhole", fault=DnsBlackholeFault(resolvers=[RESOLVER]))
    dns_applied = AppliedFault(
        injector="nft-blackhole",
        namespace="ddl-svc",
        addresses=[RESOLVER],
        rules=[
            f"add rule netdev depdrill_dns egress ip daddr {RESOLVER} udp dport 53 drop",
            f"add rule netdev depdrill_dns egress ip daddr {RESOLVER} tcp dport 53 drop",
        ],
        apply_ms=2.9,
        revert_ms=1.1,
        reverted=True,
    )
    add(
        dns,
        Verdict.FAILED,
        "success ratio 0% under the fault is below the 50% down threshold",
        _samples(rng, 12.0, (False, None, "timed out"), True),
        dns_applied,
    )
    reports: dict[str, ChainReport] = {}
    for b in deps:
        if b.tls_days_left is None:
            continue
        report = chain_report(b.name, b.address, b.port, b.tls_days_left)
        reports[b.name] = report
        check = CertCheck(address=b.address, port=b.port, sni=b.name)
        spec = SuiteTest(id=f"cert:{_id_part(b.name)}:{b.port}", dependency=b.name, check=check)
        verdict = Verdict.TOLERANT if report.worst is None else Verdict.DEGRADED
        rule = (
            "no certificate finding" if report.worst is None else "a warning finding: expiring-soon"
        )
        add(spec, verdict, rule, [], None, report)
    suite = Suite(
        service=ServiceSpec(name=service, target=Target(netns="ddl-svc"), probes=[PROBE], slo=SLO),
        tests=suite_tests,
    )
    run = Results(
        suite=suite,
        host=HostFacts(
            hostname="drill-host",
            kernel="6.18.0",
            injectors={
                "nft-blackhole": "available",
                "nfqueue-latency": "available",
                "netem-latency": "no sch_netem in this kernel",
            },
            latency_injector="nfqueue-latency",
        ),
        started=START + timedelta(seconds=30),
        ended=clock,
        tests=results,
    )
    return run, _graph(deps, reports)


def _graph(deps: list[Behaviour], reports: dict[str, ChainReport]) -> Graph:
    nodes: list[Node] = [
        ServiceNode(label="netns ddl-svc"),
        ResolverNode(id=resolver_id(RESOLVER), address=RESOLVER),
    ]
    links: list[Edge] = [
        QueriesEdge(source="service", target=resolver_id(RESOLVER), count=12 * len(deps) + 3)
    ]
    for i, b in enumerate(deps):
        proto = "udp" if b.proto == "udp" else "tcp"
        nodes.append(NameNode(id=name_id(b.name), name=b.name))
        links.append(
            ResolvedEdge(
                source="service",
                target=name_id(b.name),
                count=12 + i,
                qtypes=["A"],
                rcodes={"NOERROR": 12 + i},
            )
        )
        answered = b.name
        if b.cname is not None:
            nodes.append(NameNode(id=name_id(b.cname), name=b.cname))
            links.append(CnameEdge(source=name_id(b.name), target=name_id(b.cname), ttl=300))
            answered = b.cname
        nodes.append(AddressNode(id=address_id(b.address), address=b.address, family=4))
        links.append(
            AnswerEdge(source=name_id(answered), target=address_id(b.address), rtype="A", ttl=60)
        )
        end = endpoint_id(b.address, b.port, proto)
        nodes.append(
            EndpointNode(
                id=end, address=b.address, port=b.port, proto=proto, tls=reports.get(b.name)
            )
        )
        links.append(ConnectsEdge(source="service", target=end, count=30 + i))
        links.append(NamesEdge(source=end, target=name_id(b.name), via="answer"))
    return Graph(
        target="netns ddl-svc",
        target_spec=Target(netns="ddl-svc"),
        capture=CaptureStats(
            started=START,
            ended=START + timedelta(seconds=8),
            interfaces=["eth0"],
            bpf_filter="port 53 or tcp[tcpflags] & tcp-syn != 0",
            packets=900,
            dns_messages=120,
            flows=40,
        ),
        blind_spots=[
            BlindSpot(
                code=BlindSpotCode.UNANSWERED,
                count=3,
                message="3 queries for 1 name got no answer",
                examples=["telemetry.lab.test"],
            )
        ],
        nodes=nodes,
        links=links,
    )
