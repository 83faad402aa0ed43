"""results.json: what happened when each test of a suite ran against the live service."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import Field

from depdrill.artifact import Artifact, Frozen
from depdrill.discover.tls.model import ChainReport
from depdrill.generate.model import Suite


class Verdict(StrEnum):
    TOLERANT = "tolerant"  # SLO held under the fault
    DEGRADED = "degraded"  # SLO broken under the fault, healthy again after revert
    FAILED = "failed"  # service down under the fault (or a failing certificate)
    NO_RECOVERY = "no-recovery"  # still unhealthy after the fault was reverted
    SKIPPED = "skipped"
    ERROR = "error"


class ErrorReason(StrEnum):
    FAULT_NOT_EFFECTIVE = "fault-not-effective"
    PREFLIGHT_REFUSED = "preflight-refused"
    MISSING_CAPABILITY = "missing-capability"
    APPLY_FAILED = "apply-failed"
    REVERT_FAILED = "revert-failed"
    PROBE_FAILED = "probe-failed"
    INTERRUPTED = "interrupted"
    UNHEALTHY_BEFORE = "unhealthy-before-test"
    SKIPPED_BY_SUITE = "skipped-by-suite"
    HALTED = "suite-halted"
    INTERNAL = "internal-error"  # a bug in depdrill, caught so the suite goes on


PhaseName = Literal["preflight", "baseline", "apply", "verify", "observe", "revert", "recovery"]


class Sample(Frozen):
    t: float  # seconds since the test started
    phase: PhaseName
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class Phase(Frozen):
    name: PhaseName
    started: float  # seconds since the test started
    ended: float


class Check(Frozen):
    """One measurement from inside the namespace, taken to prove a fault bites."""

    what: str  # "tcp connect 198.18.0.10:443"
    expected: str  # "timeout", "slower by >= 80 ms", "connects"
    observed: str
    ok: bool
    elapsed_ms: float | None = None


class Proof(Frozen):
    effective: bool
    target: list[Check] = []
    control: list[Check] = []


class AppliedFault(Frozen):
    injector: str  # nft-blackhole, nfqueue-latency, netem-latency
    namespace: str
    rules: list[str]  # the exact rules, as an operator would type or read them
    addresses: list[str]
    apply_ms: float | None = None
    revert_ms: float | None = None
    reverted: bool = False
    deadline: datetime | None = None


class Stats(Frozen):
    samples: int
    ok: int
    success_ratio: float
    p50_ms: float | None = None
    p95_ms: float | None = None
    max_ms: float | None = None


class TestResult(Frozen):
    __test__: ClassVar[bool] = False  # not a pytest class, despite the name

    id: str
    kind: str
    dependency: str | None = None
    verdict: Verdict
    rule: str  # the sentence that decided the verdict
    reason: ErrorReason | None = None
    started: datetime
    ended: datetime
    phases: list[Phase] = []
    fault: AppliedFault | None = None
    proof: Proof | None = None
    samples: list[Sample] = []
    stats: dict[str, Stats] = {}  # per phase: baseline, observe, recovery
    tls: ChainReport | None = None


class HostFacts(Frozen):
    hostname: str
    kernel: str
    injectors: dict[str, str] = {}  # injector -> "available" or why not
    latency_injector: str | None = None


class Results(Artifact):
    """depdrill.results/v1: embeds the suite it ran, so a report needs nothing else."""

    KIND: ClassVar[str] = "results"
    VERSION: ClassVar[int] = 1

    schema_: str = Field(default="depdrill.results/v1", alias="schema")
    suite: Suite
    host: HostFacts
    started: datetime
    ended: datetime
    halted: str | None = None  # why the suite stopped early
    tests: list[TestResult]

    def count(self, verdict: Verdict) -> int:
        return sum(1 for t in self.tests if t.verdict == verdict)
