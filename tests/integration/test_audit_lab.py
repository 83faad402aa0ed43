"""The whole pipeline against the lab: every verdict and certificate defect matches the
lab's ground truth, and nothing is left behind afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from depdrill.artifact import load_json
from depdrill.discover.model import EndpointNode, Graph
from depdrill.execute.model import Results, Verdict
from depdrill.lab.testing import free_subnet_index, run_prefix
from depdrill.lab.truth import TRUTH
from depdrill.reports.build import build
from depdrill.reports.run import ReportOptions
from depdrill.reports.run import run as report_run
from depdrill.reports.testing import compare_golden, findings_text, normalised, screenshots

GOLDEN = Path(__file__).parents[1] / "reports" / "golden" / "lab_audit_findings.txt"


@dataclass(frozen=True)
class Audit:
    prefix: str
    out: Path
    exit_code: int
    stderr: str
    results: Results
    graph: Graph


def _leftovers(prefix: str) -> list[str]:
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if line.startswith(prefix)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [
        f"link {line.split(':')[1].strip()}" for line in links.splitlines() if f" {prefix}" in line
    ]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [f"nft {t}" for t in tables.splitlines() if "depdrill" in t]
    rules = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True).stdout
    found += [f"iptables {r}" for r in rules.splitlines() if "depdrill" in r]
    pids = subprocess.run(
        ["pgrep", "-f", f"/run/depdrill/lab/{prefix}/"], capture_output=True, text=True
    )
    found += [f"process {p}" for p in pids.stdout.split()]
    return found


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audit]:
    """Given a fresh lab, audited end to end through the real command line."""
    prefix, subnet = run_prefix(), free_subnet_index()
    out = tmp_path_factory.mktemp("audit")
    argv = [
        sys.executable,
        "-P",
        "-m",
        "depdrill.cli",
        "audit",
        "--lab-prefix",
        prefix,
        "--lab-subnet",
        str(subnet),
        "-o",
        str(out),
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=540)
    finally:
        # The audit tears its lab down itself; make sure even when it crashed.
        subprocess.run(
            [sys.executable, "-P", "-m", "depdrill.cli", "lab", "down", "--prefix", prefix],
            capture_output=True,
            text=True,
        )
    assert (out / "results.json").exists(), done.stderr[-3000:]
    yield Audit(
        prefix,
        out,
        done.returncode,
        done.stderr,
        load_json(out / "results.json", Results),
        load_json(out / "graph.json", Graph),
    )


def test_every_verdict_matches_the_lab_ground_truth(audit: Audit) -> None:
    # Then every test the lab expects ran, and each verdict is the expected one
    got = {t.id: t.verdict for t in audit.results.tests}
    wrong = {
        test_id: f"expected {expected.value}, got {got.get(test_id, 'nothing')}"
        for test_id, expected in TRUTH.verdicts.items()
        if got.get(test_id) != expected
    }
    rules = {t.id: t.rule for t in audit.results.tests if t.id in wrong}
    assert wrong == {}, f"{wrong}\nrules: {json.dumps(rules, indent=1)}\n{audit.stderr[-2000:]}"


def test_nothing_unexpected_was_tested(audit: Audit) -> None:
    assert sorted(t.id for t in audit.results.tests) == sorted(TRUTH.verdicts)


def test_certificate_defects_match(audit: Audit) -> None:
    # Then the chain findings on each TLS endpoint are exactly the lab's defects
    by_name = {}
    for test in audit.results.tests:
        if test.tls is not None and test.dependency:
            by_name[f"{test.dependency}:{test.tls.port}"] = {f.code for f in test.tls.findings}
    assert by_name == TRUTH.cert_findings
    tls_nodes = [n for n in audit.graph.nodes if isinstance(n, EndpointNode) and n.tls]
    assert len(tls_nodes) == len(TRUTH.cert_findings)


def test_every_fault_bit_and_was_reverted(audit: Audit) -> None:
    for test in audit.results.tests:
        if test.fault is None:
            continue
        assert test.proof is not None and test.proof.effective, test.id
        assert test.fault.reverted, test.id
        assert test.fault.rules, test.id


def test_report_and_junit_are_written_and_exit_code_says_failures(audit: Audit) -> None:
    html = (audit.out / "report.html").read_text()
    assert "payments.lab.test" in html and "<script" not in html
    junit = (audit.out / "junit.xml").read_text()
    assert "<testsuite" in junit
    # Some tests fail against the lab by design: exit 1
    assert audit.exit_code == 1, audit.stderr[-2000:]


def test_nothing_is_left_behind(audit: Audit) -> None:
    assert _leftovers(audit.prefix) == []


def test_findings_read_as_reviewed(audit: Audit) -> None:
    # When the report's findings are built from the real audit
    findings = build(audit.results, audit.graph).findings
    # Then, with the subnet, dates, probe counts and measured times as placeholders, they
    # read exactly as the golden: the resolver is a single point of failure, payments has
    # no timeout, recommend's certificate expires soon (DEPDRILL_UPDATE_GOLDEN=1 rewrites)
    compare_golden(GOLDEN, normalised(findings_text(findings)))
    assert [f.code for f in findings] == ["resolver-spof", "no-timeout", "cert-expiring"]


def test_screenshots_of_the_audit_report(audit: Audit, tmp_path: Path) -> None:
    # When chromium shoots the audit's own report.html at desktop and narrow width
    shots = screenshots(audit.out / "report.html", "report-lab-audit", tmp_path)
    # Then both are in $DEPDRILL_ARTIFACTS (screenshot() checks the size and not blank)
    assert [s.name for s in shots] == [
        "report-lab-audit-desktop.png",
        "report-lab-audit-narrow.png",
    ]


def test_what_changed_since_an_earlier_audit(audit: Audit) -> None:
    # Given an earlier audit in which payments' outage was tolerated and payments lived
    # at another address
    payments = "payments.lab.test"
    earlier = [
        t.model_copy(
            update={
                "verdict": Verdict.TOLERANT if t.id == f"blackhole:{payments}" else t.verdict,
                "fault": t.fault.model_copy(update={"addresses": ["198.18.99.10"]}),
            }
        )
        if t.dependency == payments and t.fault is not None
        else t
        for t in audit.results.tests
    ]
    previous = audit.results.model_copy(update={"tests": earlier})
    # When the report compares this audit with it
    report = report_run(audit.results, audit.graph, ReportOptions(previous=previous))
    # Then the regression and the move are listed, and the page has its changes section
    changes = {(c.kind, c.subject): c for c in report.model.changes or []}
    regression = changes[("verdict", f"blackhole:{payments}")]
    assert (regression.before, regression.after, regression.better) == (
        "tolerant",
        "failed",
        False,
    )
    assert changes[("addresses", payments)].before == "198.18.99.10"
    assert 'id="changes"' in report.html and "change-worse" in report.html
