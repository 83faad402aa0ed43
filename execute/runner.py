"""Run a suite against the live service: per test, preflight -> baseline -> apply -> verify
-> observe -> revert -> recovery -> verdict, one fault at a time, always reverted."""

from __future__ import annotations

import fnmatch
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Protocol
from urllib.parse import urlsplit

from depdrill.artifact import utcnow
from depdrill.discover.tls.model import ChainReport, Severity
from depdrill.errors import DepdrillError, InputError
from depdrill.execute.follow import AddressFollower, FollowsAddresses
from depdrill.execute.injectors.base import FaultContext, Handle, Injector, InjectorError
from depdrill.execute.injectors.registry import availability, choose
from depdrill.execute.model import (
    AppliedFault,
    ErrorReason,
    HostFacts,
    Phase,
    PhaseName,
    Proof,
    Results,
    Sample,
    TestResult,
    Verdict,
)
from depdrill.execute.probes.registry import make_probe
from depdrill.execute.proof import Endpoint, Exposure, FaultProof
from depdrill.execute.safety import FaultSession
from depdrill.execute.sampler import Sampler, planned_samples
from depdrill.execute.verdict import (
    describe,
    judge,
    observation_settled,
    recovered_at,
    slo_held,
    stats,
    tolerance_settled,
)
from depdrill.generate.model import (
    BlackholeFault,
    CertCheck,
    DnsBlackholeFault,
    DnsProbe,
    Fault,
    HttpProbe,
    LatencyFault,
    Slo,
    Suite,
    SuiteTest,
    TcpProbe,
)
from depdrill.netns import Target

# Time kept between the end of an observation and the fault's deadline, for the revert.
REVERT_MARGIN_S = 3.0


class ChainChecker(Protocol):
    def __call__(
        self,
        address: str,
        port: int,
        sni: str | None,
        *,
        ca_bundle: Path | None = None,
        warn_days: int = 30,
        target: Target | None = None,
    ) -> ChainReport: ...


@dataclass(frozen=True)
class ProgressEvent:
    test_id: str
    index: int  # 1-based position among the tests that run
    total: int
    step: str  # a phase name, "verdict", or "skipped"
    detail: str = ""
    verdict: Verdict | None = None

    @property
    def rule(self) -> str:
        """With a verdict: the sentence that decided it."""
        return self.detail if self.verdict is not None else ""

    @property
    def message(self) -> str:
        """One log line: `[2/9] blackhole:api.test: observe (up to 32 samples)`."""
        tail = f" ({self.detail})" if self.detail and self.verdict is None else ""
        what = self.verdict.value if self.verdict is not None else self.step
        return f"[{self.index}/{self.total}] {self.test_id}: {what}{tail}"


@dataclass
class RunOptions:
    dry_run: bool = False
    allow_commands: bool = False
    only: list[str] = field(default_factory=list)  # test ids or globs; empty: every test
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    journal_dir: Path | None = None  # None: the safety module's default
    progress: Callable[[ProgressEvent], None] | None = None
    ca_bundle: str | None = None  # overrides the suite's defaults.ca_bundle
    # Checks a TLS endpoint's chain: depdrill.discover.tls.check.check_endpoint, handed in
    # by the shell because a stage imports only an earlier stage's models.
    check_chain: ChainChecker | None = None
    # False: every observation and recovery window runs its full length, even once the
    # verdict is certain (to compare against fixed-window tools; bench/audit_time.py).
    early_stop: bool = True


def run(suite: Suite, options: RunOptions) -> Results:
    """Run the selected tests of a suite; failures come back as verdicts, never raised."""
    target = suite.service.target
    target.check()
    selected = select(suite.tests, options.only)
    ca_bundle = options.ca_bundle or suite.defaults.ca_bundle
    probes = [
        (make_probe(spec, options.allow_commands, ca_bundle), spec.timeout_s)
        for spec in suite.service.probes
    ]
    started = utcnow()
    stop = _Stop()
    with ExitStack() as stack:
        stack.enter_context(_signals_caught(stop))
        sampler = stack.enter_context(Sampler(probes, suite.defaults.timing.interval_s, stop.event))
        suite_run = _SuiteRun(suite, options, sampler, stop, stack)
        tests = suite_run.run_all(selected)
    return Results(
        suite=suite,
        host=host_facts(suite),
        started=started,
        ended=utcnow(),
        halted=suite_run.halted,
        tests=tests,
    )


def select(tests: Sequence[SuiteTest], only: Sequence[str]) -> list[SuiteTest]:
    if not only:
        return list(tests)
    chosen = [t for t in tests if any(fnmatch.fnmatchcase(t.id, pattern) for pattern in only)]
    if not chosen:
        raise InputError(f"no test id matches {', '.join(only)}")
    return chosen


def host_facts(suite: Suite) -> HostFacts:

    latency = next(
        (t.fault for t in suite.tests if isinstance(t.fault, LatencyFault)),
        LatencyFault(addresses=["198.18.0.1"], delay_ms=100),  # only to ask which one
    )
    try:
        chosen: str | None = choose(latency).name
    except DepdrillError:
        chosen = None
    return HostFacts(
        hostname=socket.gethostname(),
        kernel=os.uname().release,
        injectors=availability(),
        latency_injector=chosen,
    )


def protected_addresses(suite: Suite) -> frozenset[str]:
    """Addresses on the probe's path, both ends: a fault must never catch them."""
    found: set[str] = set()
    for spec in suite.service.probes:
        if isinstance(spec, HttpProbe):
            host = urlsplit(spec.url).hostname or ""
            try:
                found |= {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
            except OSError:
                raise InputError(f"probe URL {spec.url!r}: cannot resolve {host!r}") from None
        elif isinstance(spec, TcpProbe):
            found.add(spec.host)
        elif isinstance(spec, DnsProbe):
            found.add(spec.server)
    # The service answers the probe at the host's address: that must stay reachable too.
    sources = {_source_address(a) for a in found}
    return frozenset(found | {s for s in sources if s is not None})


def _source_address(address: str) -> str | None:
    """The host's address on the route to `address` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 9))
        except OSError:
            return None
        return str(sock.getsockname()[0])


def control_endpoints(suite: Suite, fault: Fault) -> list[Endpoint]:
    """Endpoints of the suite's other dependencies (and its resolvers, for non-DNS faults)."""
    found: list[Endpoint] = []
    for test in suite.tests:
        other = test.fault
        if isinstance(other, BlackholeFault | LatencyFault) and "tcp" in other.protocols:
            port = other.ports[0] if other.ports else 443
            found += [Endpoint("tcp", a, port) for a in other.addresses]
        elif isinstance(other, DnsBlackholeFault) and not isinstance(fault, DnsBlackholeFault):
            found += [Endpoint("dns", r, 53) for r in other.resolvers]
        elif test.check is not None:
            found.append(Endpoint("tcp", test.check.address, test.check.port))
    return list(dict.fromkeys(found))


def fault_addresses(fault: Fault) -> list[str]:
    return list(fault.resolvers if isinstance(fault, DnsBlackholeFault) else fault.addresses)


class _Stop:
    """Set by SIGINT/SIGTERM: the current fault is reverted, the remaining tests skipped."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    @property
    def why(self) -> str:
        return f"interrupted by {self.signal_name or 'a signal'}"


@contextmanager
def _signals_caught(stop: _Stop) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread: nothing to catch here
        return
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Record:
    """What one test collects as it goes: phases, samples, timestamps."""

    def __init__(self, test: SuiteTest) -> None:
        self.test = test
        self.epoch = time.monotonic()
        self.started = utcnow()
        self.phases: list[Phase] = []
        self.samples: list[Sample] = []
        self.windows: dict[str, list[Sample]] = {}

    def now(self) -> float:
        return round(time.monotonic() - self.epoch, 4)

    @contextmanager
    def phase(self, name: PhaseName) -> Iterator[None]:
        begun = self.now()
        try:
            yield
        finally:
            self.phases.append(Phase(name=name, started=begun, ended=self.now()))

    def keep(self, name: str, samples: list[Sample]) -> list[Sample]:
        self.windows[name] = samples
        self.samples += samples
        return samples

    def finish(
        self,
        verdict: Verdict,
        rule: str,
        reason: ErrorReason | None = None,
        fault: AppliedFault | None = None,
        proof: Proof | None = None,
        tls: ChainReport | None = None,
    ) -> TestResult:
        return TestResult(
            id=self.test.id,
            kind=self.test.kind,
            dependency=self.test.dependency,
            verdict=verdict,
            rule=rule,
            reason=reason,
            started=self.started,
            ended=utcnow(),
            phases=self.phases,
            fault=fault,
            proof=proof,
            samples=self.samples,
            stats={name: stats(window) for name, window in self.windows.items() if window},
            tls=tls,
        )


class _SuiteRun:
    def __init__(
        self, suite: Suite, options: RunOptions, sampler: Sampler, stop: _Stop, stack: ExitStack
    ) -> None:
        self.suite = suite
        self.options = options
        self.sampler = sampler
        self.stop = stop
        self.stack = stack
        self.timing = suite.defaults.timing
        self.halted: str | None = None
        self.halt_reason = ErrorReason.HALTED
        self._session: FaultSession | None = None
        self._protected: frozenset[str] | None = None
        self._index = 0
        self._total = 0

    def run_all(self, tests: list[SuiteTest]) -> list[TestResult]:
        self._total = len(tests)
        results = []
        for self._index, test in enumerate(tests, start=1):
            if self.halted is None and self.stop.event.is_set():
                self.halted, self.halt_reason = self.stop.why, ErrorReason.INTERRUPTED
            if self.halted is not None:
                result = _Record(test).finish(Verdict.SKIPPED, self.halted, self.halt_reason)
            elif test.removed:
                result = _Record(test).finish(
                    Verdict.SKIPPED,
                    "removed: the dependency was not in the latest graph",
                    ErrorReason.SKIPPED_BY_SUITE,
                )
            elif test.skip:
                note = f": {test.note}" if test.note else ""
                result = _Record(test).finish(
                    Verdict.SKIPPED, f"skipped in the suite{note}", ErrorReason.SKIPPED_BY_SUITE
                )
            else:
                result = self._guarded(test)
            self._emit(
                test,
                "verdict" if result.verdict != Verdict.SKIPPED else "skipped",
                result.rule,
                result.verdict,
            )
            results.append(result)
        if self.halted is None and self.stop.event.is_set():
            self.halted = self.stop.why
        return results

    def _guarded(self, test: SuiteTest) -> TestResult:
        """One test; a bug in depdrill becomes this test's error, not the end of the suite.

        Faults are reverted by the test's own finally blocks, at the latest by the session.
        """
        started = _Record(test)
        try:
            if test.check is not None:
                return self._cert_test(test, test.check)
            assert test.fault is not None
            return self._fault_test(test, test.fault)
        except Exception as exc:  # failures are data, never the end of a suite
            return started.finish(
                Verdict.ERROR,
                f"depdrill failed inside this test: {type(exc).__name__}: {exc}",
                ErrorReason.INTERNAL,
            )

    def _emit(
        self, test: SuiteTest, step: str, detail: str = "", verdict: Verdict | None = None
    ) -> None:
        if self.options.progress is not None:
            self.options.progress(
                ProgressEvent(test.id, self._index, self._total, step, detail, verdict)
            )

    # -- certificate checks

    def _cert_test(self, test: SuiteTest, check: CertCheck) -> TestResult:
        record = _Record(test)
        if self.options.dry_run:
            return record.finish(Verdict.SKIPPED, "dry run")
        if self.options.check_chain is None:
            return record.finish(
                Verdict.ERROR,
                "no TLS chain checker was given to the runner (RunOptions.check_chain)",
                ErrorReason.PROBE_FAILED,
            )
        bundle = self.options.ca_bundle or self.suite.defaults.ca_bundle
        self._emit(test, "verify", f"TLS chain of {check.address}:{check.port}")
        with record.phase("verify"):
            try:
                report = self.options.check_chain(
                    check.address,
                    check.port,
                    check.sni,
                    ca_bundle=Path(bundle) if bundle else None,
                    warn_days=self.suite.defaults.warn_days,
                    target=self.suite.service.target,
                )
            except DepdrillError as exc:
                return record.finish(Verdict.ERROR, str(exc), ErrorReason.PROBE_FAILED)
        verdict, rule = judge_chain(report)
        return record.finish(verdict, rule, tls=report)

    # -- faults

    def _protected_set(self) -> frozenset[str]:
        if self._protected is None:
            self._protected = protected_addresses(self.suite)
        return self._protected

    def _session_for(self) -> FaultSession:
        # Opened at the first fault, not before: the watchdog and journal exist only when
        # something can be left behind; the ExitStack closes it (reverting) at the end.
        if self._session is None:
            target = self.suite.service.target
            session = (
                FaultSession(self.options.run_id, target)
                if self.options.journal_dir is None
                else FaultSession(self.options.run_id, target, self.options.journal_dir)
            )
            self._session = self.stack.enter_context(session)
        return self._session

    def _fault_test(self, test: SuiteTest, fault: Fault) -> TestResult:
        record = _Record(test)
        slo = test.slo or self.suite.service.slo
        target = self.suite.service.target
        self._emit(test, "preflight")
        with record.phase("preflight"):
            try:
                injector = choose(fault)
                ctx = FaultContext(
                    target=target,
                    run_id=self.options.run_id,
                    test_id=test.id,
                    deadline=utcnow() + timedelta(seconds=self.timing.max_fault_s),
                    protected=self._protected_set(),
                )
                refusal = injector.preflight(fault, ctx)
            except InjectorError as exc:
                return record.finish(Verdict.ERROR, exc.message, exc.reason)
            except DepdrillError as exc:
                return record.finish(Verdict.ERROR, str(exc), ErrorReason.MISSING_CAPABILITY)
            if refusal is not None:
                return record.finish(Verdict.ERROR, refusal.message, refusal.reason)
            if self.options.dry_run:
                try:
                    rules = injector.rules(fault, ctx)
                except InjectorError as exc:
                    return record.finish(Verdict.ERROR, exc.message, exc.reason)
                planned = AppliedFault(
                    injector=injector.name,
                    namespace=target.describe(),
                    rules=rules,
                    addresses=fault_addresses(fault),
                )
                return record.finish(Verdict.SKIPPED, "dry run", fault=planned)
            proof = FaultProof(target, fault, control_endpoints(self.suite, fault))
            proof.before()

        self._emit(test, "baseline")
        with record.phase("baseline"):
            baseline = self.sampler.window("baseline", self.timing.baseline_s, record.epoch)
            # One transient failure must not halt a whole suite: a service that answered
            # at all gets a second baseline, and only that one counts.
            if not slo_held(stats(baseline), slo) and any(s.ok for s in baseline):
                record.samples += baseline  # kept on the timeline, not judged
                baseline = self.sampler.window("baseline", self.timing.baseline_s, record.epoch)
            record.keep("baseline", baseline)
        if self.stop.event.is_set():
            return record.finish(Verdict.SKIPPED, self.stop.why, ErrorReason.INTERRUPTED)
        if not slo_held(stats(baseline), slo):
            self.halted = f"service unhealthy before {test.id}: {describe(stats(baseline))}"
            return record.finish(
                Verdict.SKIPPED,
                f"service unhealthy before the fault: {describe(stats(baseline))}",
                ErrorReason.UNHEALTHY_BEFORE,
            )
        return self._with_fault(record, injector, fault, ctx, proof, slo, baseline)

    def _with_fault(
        self,
        record: _Record,
        injector: Injector,
        fault: Fault,
        ctx: FaultContext,
        proof: FaultProof,
        slo: Slo,
        baseline: list[Sample],
    ) -> TestResult:
        test = record.test
        session = self._session_for()
        ctx = replace(ctx, deadline=utcnow() + timedelta(seconds=self.timing.max_fault_s))
        fault_end = time.monotonic() + self.timing.max_fault_s - REVERT_MARGIN_S
        self._emit(test, "apply", injector.name)
        with record.phase("apply"):
            began = time.monotonic()
            try:
                handle = session.apply(injector, fault, ctx)
            except InjectorError as exc:
                return record.finish(Verdict.ERROR, exc.message, exc.reason)
            except (DepdrillError, OSError) as exc:
                return record.finish(Verdict.ERROR, str(exc), ErrorReason.APPLY_FAILED)
            apply_ms = (time.monotonic() - began) * 1000
        evidence: Proof | None = None
        observed: list[Sample] = []
        exposure: Exposure | None = None
        revert_error: str | None = None
        follower = self._follower(test, fault, handle)
        try:
            # The follower stops before the revert: nothing may join a fault being removed.
            with follower if follower is not None else nullcontext():
                self._emit(test, "verify")
                with record.phase("verify"):
                    evidence = proof.verify(handle)
                if evidence.effective and not self.stop.event.is_set():
                    exposure = Exposure(handle, fault, record.epoch)
                    observed = self._observe(record, slo, fault_end, exposure)
                    exposure.poll()
        finally:
            self._emit(test, "revert")
            with record.phase("revert"):
                began = time.monotonic()
                try:
                    session.revert(handle)
                except (InjectorError, DepdrillError, OSError) as exc:
                    revert_error = str(exc)
                revert_ms = (time.monotonic() - began) * 1000
        applied = AppliedFault(
            injector=injector.name,
            namespace=ctx.target.describe(),
            rules=list(handle.rules),
            addresses=fault_addresses(fault) + (follower.added if follower else []),
            apply_ms=round(apply_ms, 3),
            revert_ms=round(revert_ms, 3),
            reverted=revert_error is None,
            deadline=ctx.deadline,
        )
        if revert_error is not None:
            self.halted = f"a fault could not be reverted in {test.id}: {revert_error}"
            return record.finish(
                Verdict.ERROR,
                f"revert failed: {revert_error}",
                ErrorReason.REVERT_FAILED,
                applied,
                evidence,
            )
        if self.stop.event.is_set():
            return record.finish(
                Verdict.ERROR,
                f"{self.stop.why}; the fault was reverted",
                ErrorReason.INTERRUPTED,
                applied,
                evidence,
            )
        if not evidence.effective:
            return record.finish(
                Verdict.ERROR,
                _not_effective(evidence),
                ErrorReason.FAULT_NOT_EFFECTIVE,
                applied,
                evidence,
            )
        self._emit(test, "recovery")
        with record.phase("recovery"):
            recovery = record.keep(
                "recovery",
                self.sampler.window(
                    "recovery",
                    self.timing.recovery_s,
                    record.epoch,
                    stop=(lambda s: recovered_at(s, slo) is not None)
                    if self.options.early_stop
                    else None,
                ),
            )
        if self.stop.event.is_set() and recovered_at(recovery, slo) is None:
            return record.finish(
                Verdict.ERROR,
                f"{self.stop.why} during recovery",
                ErrorReason.INTERRUPTED,
                applied,
                evidence,
            )
        verdict, rule = judge(baseline, observed, recovery, slo)
        if exposure is not None:
            rule += f"; {exposure.describe()}"
        if follower is not None and follower.added:
            rule += f"; the dependency also resolved to {', '.join(follower.added)}: added"
        if follower is not None and follower.errors:
            rule += f"; while following it: {'; '.join(follower.errors)}"
        return record.finish(verdict, rule, None, applied, evidence)

    def _follower(self, test: SuiteTest, fault: Fault, handle: Handle) -> AddressFollower | None:
        """Follows the dependency's name while its fault is on, where the injector can."""
        if test.dependency is None or isinstance(fault, DnsBlackholeFault):
            return None
        if not isinstance(handle, FollowsAddresses):
            return None
        return AddressFollower(self.suite.service.target, test.dependency, handle)

    def _observe(
        self, record: _Record, slo: Slo, fault_end: float, exposure: Exposure
    ) -> list[Sample]:
        # The observation never outlives the fault's deadline (the kernel expires it then).
        duration = min(self.timing.observe_s, fault_end - time.monotonic())
        planned = planned_samples(duration, self.timing.interval_s)
        self._emit(record.test, "observe", f"up to {planned} samples")

        def settled(samples: list[Sample]) -> bool:
            exposed_at = exposure.poll()  # read on every sample, early stop or not
            if not self.options.early_stop:
                return False
            return observation_settled(samples, planned, slo) or tolerance_settled(
                samples, slo, exposed_at
            )

        with record.phase("observe"):
            return record.keep(
                "observe", self.sampler.window("observe", duration, record.epoch, stop=settled)
            )


def _not_effective(proof: Proof) -> str:
    failing = [c for c in proof.target + proof.control if not c.ok]
    parts = [f"{c.what}: expected {c.expected}, got {c.observed}" for c in failing]
    return "fault not effective: " + ("; ".join(parts) or "nothing could be measured")


def judge_chain(report: ChainReport) -> tuple[Verdict, str]:
    """A certificate check: any fail finding fails, any warning degrades."""
    fails = sorted({f.code for f in report.findings if f.severity == Severity.FAIL})
    warns = sorted({f.code for f in report.findings if f.severity == Severity.WARN})
    where = f"{report.host}:{report.port}"
    if fails:
        return Verdict.FAILED, f"chain of {where} has failing findings: {', '.join(fails)}"
    if warns:
        return Verdict.DEGRADED, f"chain of {where} has warnings: {', '.join(warns)}"
    return Verdict.TOLERANT, f"chain of {where} verified with no warnings"
