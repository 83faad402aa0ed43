"""The exported pytest module, run with pytest against a real lab through the real depdrill.

Outcomes must follow the lab's ground truth: a test whose expected verdict is failed,
no-recovery or error fails; every other test passes.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from depdrill.execute.model import Verdict
from depdrill.generate import suitefile
from depdrill.generate.model import (
    BlackholeFault,
    Defaults,
    HttpProbe,
    ServiceSpec,
    Suite,
    SuiteTest,
    Timing,
)
from depdrill.generate.pytest_export import export_pytest
from depdrill.lab.testing import lab_session
from depdrill.lab.truth import TRUTH
from depdrill.netns import Target

BAD = {Verdict.FAILED, Verdict.NO_RECOVERY, Verdict.ERROR}


def test_generated_module_passes_and_fails_as_the_lab_truth_says(tmp_path: Path) -> None:
    with lab_session() as state:
        # Given a suite for two lab dependencies: the critical payments API (truth: failed
        # when blackholed) and the fire-and-forget metrics sink (truth: tolerant)
        deps = {d.role: d for d in state.dependencies}
        tests = [
            SuiteTest(
                id=f"blackhole:{dep.name}",
                dependency=dep.name,
                fault=BlackholeFault(
                    addresses=[dep.address], ports=[dep.port], protocols=[dep.proto]
                ),
            )
            for dep in (deps["pay"], deps["met"])
        ]
        suite = Suite(
            service=ServiceSpec(
                name="demo",
                target=Target(netns=state.service_netns),
                probes=[HttpProbe(url=state.service_url, timeout_s=TRUTH.probe_timeout_s)],
                slo=TRUTH.slo,
            ),
            defaults=Defaults(
                timing=Timing(interval_s=0.2, baseline_s=1, observe_s=3, recovery_s=3)
            ),
            tests=tests,
        )
        (tmp_path / "suite.yaml").write_text(suitefile.dump_suite(suite))
        (tmp_path / "test_demo_suite.py").write_text(export_pytest(suite, "suite.yaml"))
        # When pytest runs the generated module (depdrill found as `python -m depdrill.cli`)
        done = subprocess.run(
            [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--junitxml", str(tmp_path / "junit.xml"), str(tmp_path / "test_demo_suite.py")],
            capture_output=True, text=True, cwd=tmp_path, timeout=240, check=False,
        )  # fmt: skip
    # Then each test's outcome is what the truth's verdict implies
    outcomes = {
        case.get("name"): "failed" if case.find("failure") is not None else "passed"
        for case in ET.parse(tmp_path / "junit.xml").iter("testcase")
    }
    expected = {
        "test_" + t.id.replace(":", "_").replace(".", "_").replace("-", "_"): (
            "failed" if TRUTH.verdicts[t.id] in BAD else "passed"
        )
        for t in tests
    }
    assert expected == {
        "test_blackhole_payments_lab_test": "failed",
        "test_blackhole_metrics_lab_test": "passed",
    }
    assert outcomes == expected, done.stdout[-3000:]
