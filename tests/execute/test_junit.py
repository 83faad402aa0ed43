"""JUnit XML: structure CI systems read, and attacker text escaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

from depdrill.execute.junit import to_junit
from depdrill.execute.model import ErrorReason, HostFacts, Results, TestResult, Verdict
from depdrill.generate.model import (
    BlackholeFault,
    HttpProbe,
    ServiceSpec,
    Suite,
    SuiteTest,
)
from depdrill.netns import Target

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EVIL = "api.<evil>&\"x'.test\x07"


def result(
    test_id: str,
    verdict: Verdict,
    rule: str,
    reason: ErrorReason | None = None,
    kind: str = "blackhole",
) -> TestResult:
    return TestResult(
        id=test_id,
        kind=kind,
        dependency=EVIL,
        verdict=verdict,
        rule=rule,
        reason=reason,
        started=T0,
        ended=T0 + timedelta(seconds=2.5),
    )


def results() -> Results:
    fault = BlackholeFault(addresses=["198.19.0.9"])
    suite = Suite(
        service=ServiceSpec(
            name="shop<&>", target=Target(netns="svc"), probes=[HttpProbe(url="http://198.19.0.2/")]
        ),
        tests=[SuiteTest(id=f"blackhole:{n}", fault=fault) for n in "abcdef"],
    )
    return Results(
        suite=suite,
        host=HostFacts(hostname="h", kernel="6.18"),
        started=T0,
        ended=T0 + timedelta(seconds=20),
        tests=[
            result("blackhole:a", Verdict.TOLERANT, "SLO held"),
            result("blackhole:b", Verdict.DEGRADED, "SLO broken"),
            result("blackhole:c", Verdict.FAILED, f"down: {EVIL} </failure>"),
            result("blackhole:d", Verdict.NO_RECOVERY, "not healthy after revert"),
            result(
                "blackhole:e", Verdict.ERROR, "fault not effective", ErrorReason.FAULT_NOT_EFFECTIVE
            ),
            result("cert:x:443", Verdict.SKIPPED, "dry run", kind="cert"),
        ],
    )


def test_junit_structure_and_counts() -> None:
    # Given results with every verdict / When rendered and parsed back
    root = ET.fromstring(to_junit(results()))
    (suite,) = root.findall("testsuite")
    # Then one testsuite for the service, with counts CI systems show
    assert suite.get("name") == "shop<&>"
    assert (
        suite.get("tests"),
        suite.get("failures"),
        suite.get("errors"),
        suite.get("skipped"),
    ) == ("6", "2", "1", "1")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["cert:x:443"].get("classname") == "cert"
    assert cases["blackhole:a"].get("classname") == "blackhole"
    assert cases["blackhole:a"].find("failure") is None  # tolerant passes
    assert cases["blackhole:b"].find("failure") is None  # degraded passes, with its verdict
    assert cases["blackhole:d"].find("failure") is not None
    error = cases["blackhole:e"].find("error")
    assert error is not None and error.get("type") == "fault-not-effective"
    assert cases["cert:x:443"].find("skipped") is not None
    assert cases["blackhole:a"].get("time") == "2.500"
    assert cases["blackhole:b"].findtext("system-out") == "degraded: SLO broken"


def test_attacker_text_is_escaped() -> None:
    # Given a dependency name and rule with markup and a control character
    text = to_junit(results())
    root = ET.fromstring(text)
    failure = root.find("testsuite/testcase[@name='blackhole:c']/failure")
    # Then it parses as text, never as markup, with the control character replaced
    assert failure is not None
    assert failure.get("message") == "down: api.<evil>&\"x'.test? </failure>"
    props = root.findall("testsuite/testcase[@name='blackhole:c']/properties/property")
    assert {p.get("name"): p.get("value") for p in props}["dependency"] == "api.<evil>&\"x'.test?"
    assert "<evil>" not in text
