"""The computed view of a run (score, findings, dependency rows): built once, drawn as HTML,
written as JSON. Every text that came from DNS, a certificate or an error is attacker-chosen."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field

from depdrill.artifact import Artifact, Frozen
from depdrill.discover.tls.model import ChainReport, Finding
from depdrill.execute.model import AppliedFault, Phase, Proof, Sample, Stats, Verdict

Band = Literal["good", "fair", "poor"]
Severity = Literal["critical", "high", "medium", "low"]
# A dependency's colour: its worst verdict, or "untested" when no test of it ran.
Worst = Literal["no-recovery", "failed", "degraded", "error", "tolerant", "skipped", "untested"]


class ScoreCategory(Frozen):
    key: Literal["dependencies", "certificates", "blind-spots"]
    title: str
    weight: int  # share of the total, out of 100, when every category was measured
    score: int | None = None  # 0-100; None when nothing in this report measured it
    detail: str  # how this report's figure came about, in words


class Score(Frozen):
    value: int | None = None
    band: Band | None = None
    categories: list[ScoreCategory]


class ReportFinding(Frozen):
    """One thing to fix, in plain words, with the evidence and a link to it."""

    code: str  # no-timeout, no-fallback, no-recovery, latency, resolver-spof, cert-..., ...
    severity: Severity
    subject: str  # the dependency, endpoint or resolver it is about
    title: str
    evidence: list[str] = []
    fix: str
    anchor: str  # id of the section on the page holding the evidence


class TestRef(Frozen):
    __test__: ClassVar[bool] = False

    id: str
    anchor: str
    label: str  # blackhole, +100 ms, dns blackhole, cert
    verdict: Verdict


class TlsSummary(Frozen):
    anchor: str
    worst: str | None = None  # fail, warn, info
    earliest_expiry: datetime | None = None
    days_left: float | None = None
    verified: bool


class DependencyRow(Frozen):
    anchor: str
    kind: Literal["name", "resolver"]
    name: str
    canonical: str
    cnames: list[str] = []
    addresses: list[str] = []
    endpoints: list[str] = []  # address:port/proto
    queries: int = 0
    flows: int = 0
    tls: list[TlsSummary] = []
    tests: list[TestRef] = []
    worst: Worst


class ErrorCount(Frozen):
    error: str
    count: int


class TestView(Frozen):
    __test__: ClassVar[bool] = False

    id: str
    anchor: str
    kind: str
    label: str
    dependency: str | None = None
    verdict: Verdict
    rule: str
    reason: str | None = None
    fault_spec: list[str] = []  # the fault as the suite asked for it
    budget: str  # the SLO it was judged against, in words
    tls_anchor: str | None = None  # a certificate test's endpoint section
    started: datetime
    ended: datetime
    phases: list[Phase] = []
    fault: AppliedFault | None = None
    proof: Proof | None = None
    stats: dict[str, Stats] = {}
    errors: list[ErrorCount] = []
    samples: list[Sample] = []


class TlsView(Frozen):
    anchor: str
    endpoint: str  # host:port
    dependencies: list[str] = []
    report: ChainReport
    findings: list[Finding] = []


class BlindSpotView(Frozen):
    code: str
    title: str
    message: str
    why: str  # why it matters to the reader
    fix: str
    count: int = 0
    examples: list[str] = []
    penalty: int = 0  # points it takes off the blind-spots category


class Change(Frozen):
    kind: Literal[
        "verdict",
        "test-added",
        "test-removed",
        "dependency-added",
        "dependency-removed",
        "certificate",
        "addresses",
        "score",
    ]
    subject: str
    before: str | None = None
    after: str | None = None
    better: bool | None = None  # None: neither better nor worse


class ScanInfo(Frozen):
    service: str
    target: str
    probes: list[str]
    slo: str
    started: datetime
    ended: datetime
    host: str
    kernel: str
    latency_injector: str | None = None
    producer: str
    halted: str | None = None
    verdicts: dict[str, int] = {}
    discovery: str | None = None  # the capture window and counts, when a graph was given
    previous: datetime | None = None  # when the run compared against started


class ReportModel(Artifact):
    """depdrill.report/v1: what the HTML page shows, as data."""

    KIND: ClassVar[str] = "report"
    VERSION: ClassVar[int] = 1

    schema_: str = Field(default="depdrill.report/v1", alias="schema")
    scan: ScanInfo
    score: Score
    findings: list[ReportFinding]  # most important first; the page's top shows the first five
    dependencies: list[DependencyRow]
    tests: list[TestView]
    tls: list[TlsView]
    blind_spots: list[BlindSpotView]
    changes: list[Change] | None = None  # None: no previous run was given
