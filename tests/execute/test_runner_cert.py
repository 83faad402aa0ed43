"""Certificate tests in a suite: the chain an endpoint serves decides the verdict."""

from __future__ import annotations

from pathlib import Path

from execute_servers import root_and_leaf, tls_server

from depdrill.discover.tls.check import check_endpoint
from depdrill.execute.model import Verdict
from depdrill.execute.runner import RunOptions, run
from depdrill.generate.model import (
    CertCheck,
    Defaults,
    HttpProbe,
    ServiceSpec,
    Suite,
    SuiteTest,
)
from depdrill.netns import Target
from depdrill.testing import ScratchNet


def cert_suite(svc: str, address: str, port: int, root: Path | None, warn_days: int) -> Suite:
    return Suite(
        service=ServiceSpec(
            name="shop",
            target=Target(netns=svc),
            probes=[HttpProbe(url=f"http://{address}:1/")],  # never probed: no fault tests
        ),
        defaults=Defaults(warn_days=warn_days, ca_bundle=str(root) if root else None),
        tests=[
            SuiteTest(
                id=f"cert:dep.test:{port}",
                dependency="dep.test",
                check=CertCheck(address=address, port=port, sni="dep.test"),
            ),
            SuiteTest(
                id="cert:skipped.test:443",
                skip=True,
                note="owned by another team",
                check=CertCheck(address=address, port=443, sni="skipped.test"),
            ),
        ],
    )


def test_cert_checks_judge_findings(scratch_net: ScratchNet, tmp_path: Path) -> None:
    # Given a dependency serving a chain from a private root, 20 days from expiry,
    # reached from inside the service's namespace
    svc = scratch_net.add("svc", 2)
    dep = scratch_net.add("dep", 3)
    address = scratch_net.address(3)
    context, root = root_and_leaf(tmp_path, address, "dep.test", leaf_days=20)
    with tls_server(context, address, Target(netns=dep)) as port:
        # When checked trusting that root, with a 30-day warning window
        trusted = run(
            cert_suite(svc, address, port, root, 30), RunOptions(check_chain=check_endpoint)
        )
        # When checked with the system trust store
        untrusted = run(
            cert_suite(svc, address, port, None, 30), RunOptions(check_chain=check_endpoint)
        )
        # When checked trusting the root with a 10-day window
        healthy = run(
            cert_suite(svc, address, port, root, 10), RunOptions(check_chain=check_endpoint)
        )
    # Then: a warning degrades, a chain to an unknown root fails, a clean chain is tolerant
    warned = trusted.tests[0]
    assert warned.verdict == Verdict.DEGRADED, warned.rule
    assert "expiring-soon" in warned.rule and warned.tls is not None and warned.tls.verified
    failed = untrusted.tests[0]
    assert failed.verdict == Verdict.FAILED and failed.tls is not None, failed.rule
    fail_codes = {f.code for f in failed.tls.findings if f.severity == "fail"}
    assert fail_codes and all(code in failed.rule for code in fail_codes)
    assert healthy.tests[0].verdict == Verdict.TOLERANT, healthy.tests[0].rule
    # And a test the suite skips is reported as such, with its note
    skipped = trusted.tests[1]
    assert skipped.verdict == Verdict.SKIPPED and "owned by another team" in skipped.rule
    # And a dry run checks nothing
    dry = run(
        cert_suite(svc, address, 9, root, 30), RunOptions(dry_run=True, check_chain=check_endpoint)
    )
    assert dry.tests[0].verdict == Verdict.SKIPPED and dry.tests[0].rule == "dry run"
    # And a runner given no chain checker says so instead of guessing
    (unchecked, _) = run(cert_suite(svc, address, 9, root, 30), RunOptions()).tests
    assert unchecked.verdict == Verdict.ERROR and "check_chain" in unchecked.rule
