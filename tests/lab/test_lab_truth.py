"""The ground truth names exactly the tests depdrill generates for the lab's dependencies."""

from __future__ import annotations

from depdrill.execute.model import Verdict
from depdrill.generate.model import SuiteTest
from depdrill.lab.model import Layout
from depdrill.lab.truth import EXPIRY_WARN_DAYS, LEAF_DAYS, TRUTH


def test_truth_covers_every_dependency_the_service_resolves() -> None:
    # Given the lab's dependencies as the service names them in DNS
    deps = Layout.of("ddl", 0).dependencies
    # When the expected test ids are derived from them
    expected = {"dns:resolver"}
    for dep in deps:
        expected.add(f"blackhole:{dep.name}")
        if dep.proto == "tcp":
            expected |= {f"latency-100ms:{dep.name}", f"latency-1000ms:{dep.name}"}
        if dep.tls:
            expected.add(f"cert:{dep.name}:{dep.port}")
    # Then the truth has a verdict for exactly those, and each is a valid suite test id
    assert set(TRUTH.verdicts) == expected
    for test_id in expected:
        assert SuiteTest.model_validate({"id": test_id, "check": None, "fault": {
            "kind": "dns-blackhole", "resolvers": ["198.18.0.2"]}}).id == test_id  # fmt: skip


def test_truth_certificates_match_what_up_issues() -> None:
    # Given the leaf lifetimes `lab up` uses
    # Then a leaf inside the warning window is expected to be found expiring, and only it
    for name, days in LEAF_DAYS.items():
        findings = TRUTH.cert_findings[f"{name}:443"]
        assert ("expiring-soon" in findings) is (days < EXPIRY_WARN_DAYS)
        cert_verdict = TRUTH.verdicts[f"cert:{name}:443"]
        assert cert_verdict is (Verdict.DEGRADED if findings else Verdict.TOLERANT)


def test_the_lab_probe_allows_slow_answers_to_count_as_answers() -> None:
    # Given the truth's probe and SLO: 1000 ms on payments (~3 s per request) is degraded,
    # which needs a probe timeout above ~3 s and a latency budget below it
    assert TRUTH.probe_timeout_s >= 4.0
    assert TRUTH.slo.p95_ms < 3000 * 0.9
    # And 100 ms on payments (~300 ms) fits inside the budget
    assert TRUTH.slo.p95_ms > 300 * 2
