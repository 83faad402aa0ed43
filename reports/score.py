"""The 0-100 resilience score: three categories, weighted, banded as Gremlin bands its score."""

from __future__ import annotations

from collections.abc import Sequence

from depdrill.discover.tls.model import Severity
from depdrill.execute.model import TestResult, Verdict
from depdrill.reports.model import Band, BlindSpotView, Score, ScoreCategory, TlsView

WEIGHTS = {"dependencies": 60, "certificates": 25, "blind-spots": 15}
# A degraded service still answered; it earns half of what a tolerant one does.
CREDIT = {
    Verdict.TOLERANT: 1.0,
    Verdict.DEGRADED: 0.5,
    Verdict.FAILED: 0.0,
    Verdict.NO_RECOVERY: 0.0,
}
FAULT_KINDS = frozenset({"blackhole", "latency", "dns-blackhole"})


def band(value: int) -> Band:
    if value > 70:
        return "good"
    if value >= 50:
        return "fair"
    return "poor"


def _dependency_key(test: TestResult) -> str:
    if test.dependency:
        return test.dependency
    return "the resolver" if test.kind == "dns-blackhole" else test.id


def dependencies_category(tests: Sequence[TestResult]) -> ScoreCategory:
    """Each dependency (the resolver is one) earns the credit of its worst fault test: a
    dependency that takes the service down is not made good by surviving small delays."""
    title = "Dependencies tolerated"
    worst: dict[str, float] = {}
    for test in tests:
        if test.kind in FAULT_KINDS and test.verdict in CREDIT:
            key = _dependency_key(test)
            worst[key] = min(worst.get(key, 1.0), CREDIT[test.verdict])
    if not worst:
        return ScoreCategory(
            key="dependencies",
            title=title,
            weight=WEIGHTS["dependencies"],
            score=None,
            detail="No fault test reached a verdict.",
        )
    credits = list(worst.values())
    value = round(100 * sum(credits) / len(credits))
    detail = (
        f"{len(credits)} dependencies: {credits.count(1.0)} tolerated every fault (full credit), "
        f"{credits.count(0.5)} degraded (half credit), "
        f"{credits.count(0.0)} failed or did not recover (no credit)."
    )
    return ScoreCategory(
        key="dependencies", title=title, weight=WEIGHTS["dependencies"], score=value, detail=detail
    )


def _endpoint_credit(view: TlsView) -> float:
    if not view.report.handshake_ok:
        return 0.0
    severities = {f.severity for f in view.findings}
    if Severity.FAIL in severities:
        return 0.0
    if Severity.WARN in severities:
        return 0.5
    return 1.0


def certificates_category(tls: Sequence[TlsView]) -> ScoreCategory:
    title = "Certificates"
    if not tls:
        return ScoreCategory(
            key="certificates",
            title=title,
            weight=WEIGHTS["certificates"],
            score=None,
            detail="No TLS endpoint was checked.",
        )
    credits = [_endpoint_credit(v) for v in tls]
    value = round(100 * sum(credits) / len(credits))
    detail = (
        f"{len(tls)} TLS endpoint(s): {credits.count(1.0)} clean (full credit), "
        f"{credits.count(0.5)} with warnings (half credit), "
        f"{credits.count(0.0)} failing (no credit)."
    )
    return ScoreCategory(
        key="certificates", title=title, weight=WEIGHTS["certificates"], score=value, detail=detail
    )


def blind_spots_category(spots: Sequence[BlindSpotView], graph_given: bool) -> ScoreCategory:
    lost = min(sum(s.penalty for s in spots), 100)
    parts = [f"{s.title.lower()} (-{s.penalty})" for s in spots if s.penalty]
    detail = "100 less the points each gap costs: " + ", ".join(parts) + "." if parts else ""
    if not detail:
        detail = "Nothing the run knows it missed."
    if not graph_given:
        detail += " No discovery graph was given: only tests that could not run count here."
    return ScoreCategory(
        key="blind-spots",
        title="Blind spots",
        weight=WEIGHTS["blind-spots"],
        score=100 - lost,
        detail=detail,
    )


def score(
    tests: Sequence[TestResult],
    tls: Sequence[TlsView],
    spots: Sequence[BlindSpotView],
    graph_given: bool,
) -> Score:
    """Weighted mean of the categories this run measured (an unmeasured one drops out)."""
    categories = [
        dependencies_category(tests),
        certificates_category(tls),
        blind_spots_category(spots, graph_given),
    ]
    measured = [c for c in categories if c.score is not None]
    if not measured or (categories[0].score is None and categories[1].score is None):
        return Score(value=None, band=None, categories=categories)
    total = sum(c.weight * (c.score or 0) for c in measured) / sum(c.weight for c in measured)
    value = round(total)
    return Score(value=value, band=band(value), categories=categories)
