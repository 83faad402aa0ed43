"""Golden tests of the findings' text: the words an SRE reads first must not drift."""

from __future__ import annotations

from pathlib import Path

from depdrill.discover.model import Graph
from depdrill.execute.model import Results, Verdict
from depdrill.reports.build import build
from depdrill.reports.synthetic import Behaviour, many, synthetic_run
from depdrill.reports.testing import compare_golden, findings_text, normalised

GOLDEN = Path(__file__).parent / "golden"


def test_lab_findings_match_golden(lab_run: tuple[Results, Graph]) -> None:
    # Given the lab's known behaviours: payments has no timeout, recommend's certificate
    # expires in 9 days, the resolver is critical, one name never answers
    results, graph = lab_run
    # When the report is built
    model = build(results, graph)
    # Then the findings read exactly as reviewed, most important first
    compare_golden(GOLDEN / "lab_findings.txt", findings_text(model.findings))
    assert [f.code for f in model.findings] == [
        "resolver-spof",
        "no-timeout",
        "cert-expiring",
        "blind-spot",
    ]


def test_fast_failure_is_told_apart_from_a_missing_timeout() -> None:
    # Given a dependency whose outage the service answers at once with errors (it has a
    # timeout, but no fallback), and one that makes it slow but keeps it up
    behaviours = [
        Behaviour("orders.lab.test", "198.18.0.30", 443, blackhole="fail-fast", timeout_ms=200),
        Behaviour("search.lab.test", "198.18.0.31", 443, blackhole="slow", timeout_ms=1300),
    ]
    results, graph = synthetic_run(behaviours)
    # When the report is built
    by_subject = {f.subject: f for f in build(results, graph).findings}
    # Then the first is "no fallback" (not "no timeout"), the second a slow fallback
    orders, search = by_subject["orders.lab.test"], by_subject["search.lab.test"]
    assert orders.code == "no-fallback"
    assert orders.title == (
        "/health fails when orders.lab.test is unreachable: there is no fallback"
    )
    assert orders.evidence[0] == (
        "Blackhole of orders.lab.test → failed: 0 of 32 probes succeeded; "
        "most common error: “HTTP 503” (32×)."
    )
    assert search.code == "latency"  # its +1000 ms test broke the budget before the outage did
    assert search.title == (
        "1000 ms of latency on search.lab.test made /health take 1.1 s (p95), "
        "over the 800 ms budget"
    )


def test_no_recovery_is_the_first_finding() -> None:
    # Given a dependency after whose outage the service never came back
    behaviours = [Behaviour("session.lab.test", "198.18.0.40", 6379, blackhole="no-recovery")]
    results, graph = synthetic_run(behaviours)
    # When the report is built
    first = build(results, graph).findings[0]
    # Then the reader is told first, with the recovery evidence
    assert first.code == "no-recovery"
    assert first.title == "/health did not recover after session.lab.test came back"
    assert first.evidence[0] == "0 of 40 probes succeeded after the fault was removed."


def test_many_dependencies_with_one_weakness_make_one_finding() -> None:
    # Given 50 dependencies, seven of which have no timeout
    results, graph = synthetic_run(many(50))
    # When the report is built
    findings = build(results, graph).findings
    # Then each weakness is one finding naming its dependencies, so the top five differ
    codes = [f.code for f in findings]
    assert len(codes) == len(set(codes))
    no_timeout = next(f for f in findings if f.code == "no-timeout")
    assert no_timeout.title == (
        "Calls to 7 dependencies have no timeout: with any one unreachable, /health failed"
    )
    assert no_timeout.evidence[0].startswith("Calls to dep-01.svc.test have no timeout")


def test_a_resilient_service_hears_so() -> None:
    # Given dependencies that all have timeouts and fallbacks and no certificate trouble
    behaviours = [Behaviour("cache.lab.test", "198.18.0.12", 6379, timeout_ms=100)]
    results, graph = synthetic_run(behaviours)
    results = results.model_copy(
        update={
            "tests": [
                t.model_copy(update={"verdict": Verdict.TOLERANT})
                if t.kind == "dns-blackhole"
                else t
                for t in results.tests
            ]
        }
    )
    graph = graph.model_copy(update={"blind_spots": []})
    # When the report is built
    findings = build(results, graph).findings
    # Then the one finding says the suite passed and to keep it running
    assert [f.code for f in findings] == ["all-tolerated"]
    assert findings[0].title == ("4 fault tests on 1 dependencies left /health within its budget")


def test_a_timeout_above_the_budget_is_named_in_the_fix() -> None:
    # Given a dependency whose outage the service answers with errors, but only after 3 s
    behaviours = [Behaviour("orders.lab.test", "198.18.0.30", 443, blackhole="fail-fast")]
    results, graph = synthetic_run(behaviours)
    slow = [
        t.model_copy(
            update={
                "samples": [
                    s if s.ok else s.model_copy(update={"latency_ms": 3000.0}) for s in t.samples
                ]
            }
        )
        for t in results.tests
    ]
    # When the report is built
    finding = next(
        f
        for f in build(results.model_copy(update={"tests": slow}), graph).findings
        if f.subject == "orders.lab.test"
    )
    # Then the fix asks for a shorter timeout as well as a fallback
    assert finding.code == "no-fallback"
    assert finding.fix == (
        "Lower the timeout on calls to orders.lab.test below the 800 ms budget (failures took "
        "3.0 s), and add a fallback (a cached or default answer, or answer without it) so "
        "/health stays up while orders.lab.test is down."
    )


def test_two_audits_of_the_lab_read_the_same_once_normalised() -> None:
    # Given the same findings from two real audits of the lab: other subnets, other counts
    # of probes, other measured times, other days
    first = (
        "[critical] resolver-spof #test-dns-resolver-cabcc30c\n"
        "  The resolver (198.18.147.2) is a single point of failure\n"
        "  - 0 of 17 probes succeeded; they waited (“timeout after 5.0 s”, 17×).\n"
        "  - +1000 ms of latency → degraded: 16 of 16 probes succeeded, p95 3.0 s "
        "(7.5 ms before the fault).\n"
        "[high] cert-expiring #tls-198-18-147-11-443-41581dee\n"
        "  expires in 10.0 days (2026-12-07); 1000 ms of latency made /health take 2.9 s (p95)\n"
    )
    second = (
        "[critical] resolver-spof #test-dns-resolver-cabcc30c\n"
        "  The resolver (198.18.9.2) is a single point of failure\n"
        "  - 0 of 18 probes succeeded; they waited (“timeout after 5.0 s”, 18×).\n"
        "  - +1000 ms of latency → degraded: 15 of 16 probes succeeded, p95 3.1 s "
        "(12 ms before the fault).\n"
        "[high] cert-expiring #tls-198-18-9-11-443-0aa1b2c3\n"
        "  expires in 10.0 days (2026-12-08); 1000 ms of latency made /health take 3.0 s (p95)\n"
    )
    # When both are normalised
    # Then they are equal, and what was configured (budget, delay, timeout) is still there
    assert normalised(first) == normalised(second)
    assert "+1000 ms of latency" in normalised(first)
    assert "“timeout after 5.0 s”" in normalised(first)
    assert "0 of <n> probes" in normalised(first)
    # But a finding that changed its subject or its wording does not pass as the same
    assert normalised(first) != normalised(first.replace("0 of 17", "3 of 17"))
    assert normalised(first) != normalised(first.replace("degraded", "tolerant"))
