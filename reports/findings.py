"""The findings: what breaks the service and what to fix, in plain words, derived from the
verdicts, the probe statistics, the TLS findings and the blind spots (never per lab)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from depdrill.discover.model import Graph
from depdrill.discover.tls.model import CertFacts, Finding, Severity
from depdrill.execute.model import Results, Sample, Stats, TestResult, Verdict
from depdrill.generate.model import LatencyFault, Slo
from depdrill.reports.model import BlindSpotView, ReportFinding, TlsView
from depdrill.reports.text import (
    anchor,
    duration,
    health_check,
    percent,
    probe_timeout_ms,
    visible,
)

TOP = 5  # findings shown at the top of the page; the rest follow in a short list
_SEVERITY_RANK = {"critical": 0, "high": 1, "medium": 2, "low": 3}
_CODE_RANK = {
    "no-recovery": 0,
    "resolver-spof": 1,
    "no-timeout": 2,
    "no-fallback": 3,
    "cert-fail": 4,
    "latency": 5,
    "slow-fallback": 6,
    "cert-expiring": 7,
    "cert-warn": 8,
    "untested": 9,
    "blind-spot": 10,
    "all-tolerated": 11,
}
_BROKEN = {Verdict.FAILED, Verdict.NO_RECOVERY, Verdict.DEGRADED}


def findings(
    results: Results, tls: Sequence[TlsView], spots: Sequence[BlindSpotView], graph: Graph | None
) -> list[ReportFinding]:
    """Every finding, most important first (the page's top shows the first five)."""
    found: list[ReportFinding] = []
    by_dependency: dict[str, list[TestResult]] = {}
    for test in results.tests:
        if test.kind in {"blackhole", "latency"} and test.dependency is not None:
            by_dependency.setdefault(test.dependency, []).append(test)
    for name, tests in sorted(by_dependency.items()):
        finding = _dependency_finding(results, name, tests)
        if finding is not None:
            found.append(finding)
    found.extend(_resolver_findings(results, graph))
    for view in tls:
        found.extend(_tls_findings(view))
    found.extend(_blind_spot_findings(spots))
    if not any(f.severity in {"critical", "high"} for f in found):
        found.extend(_all_tolerated(results))
    found = _grouped(found, health_check(results.suite))
    return sorted(found, key=lambda f: (_SEVERITY_RANK[f.severity], _CODE_RANK[f.code], f.subject))


# When several dependencies share a weakness, one finding names them all, so the top five
# stay five different things to fix (at 50 dependencies, ten "no timeout" lines say less).
_GROUP_TITLE = {
    "no-recovery": "{check} did not recover after any of {n} dependencies came back",
    "no-timeout": "Calls to {n} dependencies have no timeout: with any one unreachable, {check} "
    "failed",
    "no-fallback": "{check} fails when any of {n} dependencies is unreachable: no fallback",
    "latency": "Latency on {n} dependencies pushes {check} over its budget",
    "slow-fallback": "With any of {n} dependencies unreachable, {check} stayed up but broke its "
    "budget",
    "cert-expiring": "{n} certificates expire within the warning window",
}
_GROUP_FIX = {
    "no-recovery": "Make sure the service reconnects after a dependency fails: bounded retries "
    "with backoff, health-checked connection pools, circuit breakers that close again, and no "
    "failed lookup cached for long.",
    "no-timeout": "Add a timeout below the budget on calls to each of them, and a fallback (a "
    "cached or default answer) so {check} degrades instead of failing.",
    "no-fallback": "Give calls to each of them a fallback (a cached or default answer, or answer "
    "without it) so {check} stays up while one is down.",
    "latency": "Set a timeout on calls to each of them below the budget, leaving room for the "
    "rest of the request, and fall back when it fires.",
    "slow-fallback": "Lower the timeouts on calls to them so each fallback starts well within "
    "the budget.",
    "cert-expiring": "Renew them now, and automate renewal (ACME) with an alert 30 days ahead.",
}
_GROUP_SHOWN = 8


def _grouped(found: list[ReportFinding], check: str) -> list[ReportFinding]:
    by_code: dict[str, list[ReportFinding]] = {}
    for finding in found:
        by_code.setdefault(finding.code, []).append(finding)
    out = []
    for code, members in by_code.items():
        if code not in _GROUP_TITLE or len(members) == 1:
            out.extend(members)
            continue
        members.sort(key=lambda f: (_SEVERITY_RANK[f.severity], f.subject))
        evidence = [f.title for f in members[:_GROUP_SHOWN]]
        if len(members) > _GROUP_SHOWN:
            evidence.append(f"and {len(members) - _GROUP_SHOWN} more (see the dependency table)")
        out.append(
            ReportFinding(
                code=code,
                severity=members[0].severity,
                subject=", ".join(f.subject for f in members),
                title=_GROUP_TITLE[code].format(n=len(members), check=check),
                evidence=evidence,
                fix=_GROUP_FIX[code].format(check=check),
                anchor=members[0].anchor,
            )
        )
    return out


def _slo(results: Results, test: TestResult) -> Slo:
    spec = next((t for t in results.suite.tests if t.id == test.id), None)
    return spec.slo if spec is not None and spec.slo is not None else results.suite.service.slo


def _observe(test: TestResult) -> Stats | None:
    return test.stats.get("observe")


def _delay_ms(results: Results, test: TestResult) -> int | None:
    spec = next((t for t in results.suite.tests if t.id == test.id), None)
    if spec is not None and isinstance(spec.fault, LatencyFault):
        return spec.fault.delay_ms
    return None


def _common_error(samples: Sequence[Sample], phase: str) -> tuple[str, int] | None:
    errors = Counter(s.error for s in samples if s.phase == phase and not s.ok and s.error)
    if not errors:
        return None
    text, count = min(errors.items(), key=lambda kv: (-kv[1], kv[0]))
    return visible(text, 120), count


def _hung(results: Results, test: TestResult) -> bool:
    """Did the failing probes wait until their own timeout (the service never gave up)?"""
    failed = [s for s in test.samples if s.phase == "observe" and not s.ok]
    if not failed:
        return False
    limit = probe_timeout_ms(results.suite)
    waited = sum(
        1
        for s in failed
        if (s.latency_ms is not None and s.latency_ms >= 0.8 * limit)
        or (s.error is not None and "timed out" in s.error.lower())
        or (s.error is not None and "timeout" in s.error.lower())
    )
    return waited * 2 >= len(failed)


def _failed_median_ms(test: TestResult) -> float | None:
    """How long the failing probes took, when they said (an error page, a refused call)."""
    waits = sorted(
        s.latency_ms
        for s in test.samples
        if s.phase == "observe" and not s.ok and s.latency_ms is not None
    )
    return waits[len(waits) // 2] if waits else None


def _ratio_line(stats: Stats | None, what: str) -> str:
    if stats is None or stats.samples == 0:
        return f"No probe answered {what}."
    return f"{stats.ok} of {stats.samples} probes succeeded {what}."


def _worst_first(tests: Sequence[TestResult]) -> list[TestResult]:
    order = {Verdict.NO_RECOVERY: 0, Verdict.FAILED: 1, Verdict.DEGRADED: 2}
    return sorted((t for t in tests if t.verdict in order), key=lambda t: (order[t.verdict], t.id))


def _dependency_finding(
    results: Results, name: str, tests: Sequence[TestResult]
) -> ReportFinding | None:
    """One finding per dependency: titled by its worst result, with every broken test as
    evidence (a missing timeout shows in the blackhole and in the latency tests alike)."""
    broken = _worst_first(tests)
    if not broken:
        return None
    shown = visible(name, 80)
    check = health_check(results.suite)
    worst = broken[0]
    budget = _slo(results, worst).p95_ms
    blackhole = next((t for t in broken if t.kind == "blackhole"), None)
    latency = sorted(
        (t for t in broken if t.kind == "latency"), key=lambda t: _delay_ms(results, t) or 0
    )
    evidence = [_evidence_line(results, t, shown) for t in broken]
    anchor_of = anchor("test", worst.id)
    if worst.verdict == Verdict.NO_RECOVERY:
        recovery = worst.stats.get("recovery")
        return ReportFinding(
            code="no-recovery",
            severity="critical",
            subject=name,
            anchor=anchor_of,
            title=f"{check} did not recover after {shown} came back",
            evidence=[_ratio_line(recovery, "after the fault was removed"), *evidence],
            fix=f"Make sure the service reconnects to {shown} after a failure: bounded retries "
            "with backoff, health-checked connection pools, circuit breakers that close again, "
            "and no failed lookup cached for long.",
        )
    if blackhole is not None and blackhole.verdict == Verdict.FAILED:
        if _hung(results, blackhole):
            return ReportFinding(
                code="no-timeout",
                severity="critical",
                subject=name,
                anchor=anchor_of,
                title=f"Calls to {shown} have no timeout: with {shown} unreachable, {check} failed",
                evidence=evidence,
                fix=f"Add a timeout below the {duration(budget)} budget on calls to {shown}, and "
                f"a fallback (a cached or default answer) so {check} degrades instead of failing.",
            )
        waited = _failed_median_ms(blackhole)
        slow = waited is not None and waited > budget
        return ReportFinding(
            code="no-fallback",
            severity="critical",
            subject=name,
            anchor=anchor_of,
            title=f"{check} fails when {shown} is unreachable: there is no fallback",
            evidence=evidence,
            fix=(
                f"Lower the timeout on calls to {shown} below the {duration(budget)} budget "
                f"(failures took {duration(waited)}), and add a fallback "
                if slow
                else f"Give calls to {shown} a fallback "
            )
            + f"(a cached or default answer, or answer without it) so {check} stays up while "
            f"{shown} is down.",
        )
    if latency:
        first = latency[0]
        delay = _delay_ms(results, first)
        observed = _observe(first)
        severity = "critical" if first.verdict == Verdict.FAILED else "high"
        p95 = observed.p95_ms if observed is not None else None
        if first.verdict == Verdict.FAILED:
            title = f"{delay} ms of latency on {shown} took {check} down"
        elif p95 is not None and p95 > budget:
            title = (
                f"{delay} ms of latency on {shown} made {check} take {duration(p95)} (p95), "
                f"over the {duration(budget)} budget"
            )
        else:
            failing = 1 - observed.success_ratio if observed is not None else 1.0
            title = (
                f"{delay} ms of latency on {shown} made {percent(failing)} of {check} probes fail"
            )
        return ReportFinding(
            code="latency",
            severity=severity,
            subject=name,
            anchor=anchor("test", first.id),
            title=title,
            evidence=evidence,
            fix=f"Set a timeout on calls to {shown} below the {duration(budget)} budget, leaving "
            "room for the rest of the request, and fall back when it fires.",
        )
    assert blackhole is not None  # broken holds only blackhole and latency tests
    return ReportFinding(
        code="slow-fallback",
        severity="high",
        subject=name,
        anchor=anchor_of,
        title=f"With {shown} unreachable, {check} stayed up but broke its budget",
        evidence=evidence,
        fix=f"Lower the timeout on calls to {shown} so the fallback starts well within the "
        f"{duration(budget)} budget.",
    )


def _evidence_line(results: Results, test: TestResult, shown: str) -> str:
    """One test in a sentence: "Blackhole of X → failed: 0 of 32 probes succeeded; ..."."""
    observed = _observe(test)
    baseline = test.stats.get("baseline")
    if test.kind == "latency":
        what = f"+{_delay_ms(results, test)} ms of latency"
    else:
        what = f"Blackhole of {shown}"
    line = f"{what} → {test.verdict.value}"
    if observed is not None and observed.samples:
        line += f": {observed.ok} of {observed.samples} probes succeeded"
        if observed.p95_ms is not None and observed.ok:
            line += f", p95 {duration(observed.p95_ms)}"
            if baseline is not None and baseline.p95_ms is not None:
                line += f" ({duration(baseline.p95_ms)} before the fault)"
    common = _common_error(test.samples, "observe")
    if common is not None:
        text, count = common
        if test.kind == "blackhole" and _hung(results, test):
            timeout = duration(probe_timeout_ms(results.suite))
            line += f"; they waited for their {timeout} timeout (“{text}”, {count}×)"
        else:
            line += f"; most common error: “{text}” ({count}×)"
    return line + "."


def _resolver_findings(results: Results, graph: Graph | None) -> list[ReportFinding]:
    out = []
    resolvers = graph.resolvers() if graph is not None else []
    for test in results.tests:
        if test.kind != "dns-blackhole" or test.verdict not in _BROKEN:
            continue
        addresses = test.fault.addresses if test.fault is not None else []
        who = ", ".join(addresses) or "the resolver"
        evidence = [_ratio_line(_observe(test), "while the resolver was silent")]
        common = _common_error(test.samples, "observe")
        if common is not None:
            evidence.append(f"Most common error: “{common[0]}” ({common[1]}×).")
        if len(resolvers) == 1:
            evidence.append("Discovery saw the service send every query to this one resolver.")
        down = test.verdict != Verdict.DEGRADED
        out.append(
            ReportFinding(
                code="resolver-spof",
                severity="critical" if down else "high",
                subject=who,
                anchor=anchor("test", test.id),
                title=f"The resolver ({who}) is a single point of failure: with it silent, "
                f"{health_check(results.suite)} {'failed' if down else 'broke its budget'}",
                evidence=evidence,
                fix="Give the service a second resolver, or a local caching resolver that serves "
                "stale answers when upstream is silent (RFC 8767), and keep using addresses "
                "already resolved when a lookup fails.",
            )
        )
    return out


_TLS_FIX = {
    "expired": "Renew and deploy the certificate now; clients that verify refuse the connection.",
    "not-yet-valid": "Check the server's and the CA's clocks, or deploy a certificate that is "
    "valid now.",
    "hostname-mismatch": "Serve a certificate whose subject alternative names include the name "
    "clients connect to.",
    "self-signed": "Serve a certificate issued by a CA the clients trust.",
    "untrusted-root": "Serve a chain that ends at a root the clients trust.",
    "incomplete-chain": "Configure the server to send the intermediate certificates with the leaf.",
    "wrong-order": "Send the chain in order: leaf first, then each issuer.",
    "weak-key": "Reissue with a stronger key (RSA 2048+ or ECDSA P-256).",
    "weak-signature": "Reissue with a SHA-256 (or stronger) signature.",
    "no-san": "Reissue with the names in the subject alternative name extension; clients "
    "ignore the common name.",
    "unused-cert": "Drop the certificates the chain does not need.",
    "anchor-sent": "Stop sending the root: clients already have it.",
    "long-lifetime": "Reissue with a lifetime of at most 398 days.",
    "must-staple-missing": "Staple an OCSP response (the certificate demands it).",
    "revoked": "Replace the revoked certificate now.",
    "handshake-failed": "Find out why the TLS handshake fails (protocol, cipher, SNI) and fix "
    "the server.",
    "verification-failed": "Serve a chain that verifies to a trusted root.",
}


def _cert_of(view: TlsView, finding: Finding) -> CertFacts | None:
    served = view.report.served
    if finding.certificate is not None and 0 <= finding.certificate < len(served):
        return served[finding.certificate]
    return served[0] if served else None


def _tls_findings(view: TlsView) -> list[ReportFinding]:
    out = []
    where = visible(view.endpoint, 80)
    for item in view.findings:
        if item.severity == Severity.INFO:
            continue
        cert = _cert_of(view, item)
        if item.code == "expiring-soon" and cert is not None:
            days = int(cert.days_left)
            out.append(
                ReportFinding(
                    code="cert-expiring",
                    severity="high" if days <= 14 else "medium",
                    subject=view.endpoint,
                    anchor=view.anchor,
                    title=f"The certificate of {where} expires in {days} day{'s' * (days != 1)} "
                    f"({cert.not_after:%Y-%m-%d})",
                    evidence=[
                        f"{visible(cert.subject, 120)}, issued by {visible(cert.issuer, 120)}.",
                        visible(item.message, 300),
                    ],
                    fix="Renew it now, and automate renewal (ACME) with an alert 30 days ahead.",
                )
            )
            continue
        if item.code == "expired" and cert is not None:
            title = (
                f"The certificate of {where} expired {int(-cert.days_left)} day(s) ago "
                f"({cert.not_after:%Y-%m-%d})"
            )
        else:
            title = f"{where}: {visible(item.message, 200)}"
        fail = item.severity == Severity.FAIL
        out.append(
            ReportFinding(
                code="cert-fail" if fail else "cert-warn",
                severity="critical" if fail else "medium",
                subject=view.endpoint,
                anchor=view.anchor,
                title=title,
                evidence=[visible(item.message, 300)],
                fix=_TLS_FIX.get(item.code, "Fix the certificate chain this endpoint serves."),
            )
        )
    return out


def _blind_spot_findings(spots: Sequence[BlindSpotView]) -> list[ReportFinding]:
    out = []
    for spot in spots:
        if spot.penalty == 0:
            continue
        out.append(
            ReportFinding(
                code="untested" if spot.code == "untested" else "blind-spot",
                severity="medium",
                subject=spot.code,
                anchor="blind-spots",
                title=f"{spot.title}: {visible(spot.message, 200)}",
                evidence=[spot.why, *spot.examples[:3]],
                fix=spot.fix,
            )
        )
    return out


def _all_tolerated(results: Results) -> list[ReportFinding]:
    judged = [t for t in results.tests if t.kind != "cert" and t.verdict == Verdict.TOLERANT]
    if not judged:
        return []
    deps = sorted({t.dependency for t in judged if t.dependency})
    return [
        ReportFinding(
            code="all-tolerated",
            severity="low",
            subject="service",
            anchor="tests",
            title=f"{len(judged)} fault tests on {len(deps)} dependencies left "
            f"{health_check(results.suite)} within its budget",
            evidence=[],
            fix="Keep the suite in CI so a change that removes a timeout or fallback shows up.",
        )
    ]
