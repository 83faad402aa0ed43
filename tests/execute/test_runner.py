"""The runner end to end: a real service namespace, real dependencies, real faults.

The service (at .2) calls a dependency at .3 that is critical to it and one at .4 it has a
fallback for; the probe reaches the service from the host, never through a fault.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from execute_servers import Behaviour, http_server, tcp_listener
from execute_world import World, build

from depdrill.errors import InputError, TargetError
from depdrill.execute.model import ErrorReason, Results, Verdict
from depdrill.execute.runner import ProgressEvent, RunOptions, run
from depdrill.execute.verdict import MIN_EXPOSED_SAMPLES
from depdrill.generate.model import (
    BlackholeFault,
    CommandProbe,
    Defaults,
    HttpProbe,
    LatencyFault,
    ServiceSpec,
    Slo,
    Suite,
    SuiteTest,
    Timing,
)
from depdrill.netns import Target
from depdrill.testing import ScratchNet

FAST = Timing(interval_s=0.1, baseline_s=0.5, observe_s=3, recovery_s=3, max_fault_s=30)


@pytest.fixture
def world(scratch_net: ScratchNet) -> Iterator[World]:
    a, b = scratch_net.address(3), scratch_net.address(4)
    built = build(scratch_net, [f"{a},0.3,critical", f"{b},0.3,fallback"])
    try:
        yield built
    finally:
        built.stop()


def suite(world: World, tests: list[SuiteTest], probe_host: int = 2) -> Suite:
    net = world.net
    return Suite(
        service=ServiceSpec(
            name="shop",
            target=Target(netns=world.service_ns),
            probes=[HttpProbe(url=f"http://{net.address(probe_host)}:8080/health", timeout_s=2)],
            slo=Slo(success_ratio=0.95, p95_ms=800, down_ratio=0.5),
        ),
        defaults=Defaults(timing=FAST),
        tests=tests,
    )


def blackhole(world: World, host: int) -> SuiteTest:
    address = world.net.address(host)
    return SuiteTest(
        id=f"blackhole:dep{host}.test",
        dependency=f"dep{host}.test",
        fault=BlackholeFault(addresses=[address], ports=[8080], protocols=["tcp"]),
    )


def depdrill_leftovers(world: World) -> list[str]:
    """depdrill's nft tables and iptables rules still in the service's namespace."""
    tables = world.net.exec(world.service_ns, "nft", "list", "tables").stdout
    rules = world.net.exec(world.service_ns, "iptables-legacy-save").stdout
    return [line for line in (tables + rules).splitlines() if "depdrill" in line]


def test_blackhole_verdicts_follow_the_service_behaviour(world: World, tmp_path: Path) -> None:
    # Given a suite blackholing the critical dependency, then the one with a fallback
    events: list[ProgressEvent] = []
    tests = [blackhole(world, 3), blackhole(world, 4)]
    # When it runs
    results = run(suite(world, tests), RunOptions(journal_dir=tmp_path, progress=events.append))
    critical, optional = results.tests
    # Then losing the critical dependency takes the service down: failed, and early
    assert critical.verdict == Verdict.FAILED, critical.rule
    planned = round(FAST.observe_s / FAST.interval_s)
    assert 0 < critical.stats["observe"].samples < planned
    # And the fault was proven: the dependency timed out, the other one still answered
    assert critical.proof is not None and critical.proof.effective
    assert critical.proof.target[0].observed.startswith("timeout")
    assert critical.proof.control[0].what.startswith(f"tcp connect {world.net.address(4)}")
    # And the fault as applied is recorded, then reverted
    fault = critical.fault
    assert fault is not None and fault.reverted and fault.rules
    assert fault.apply_ms is not None and fault.revert_ms is not None
    assert [p.name for p in critical.phases] == [
        "preflight",
        "baseline",
        "apply",
        "verify",
        "observe",
        "revert",
        "recovery",
    ]
    # Then losing the dependency with a fallback is tolerated, and settled early: the
    # service's own packets met the fault and every sample after that was fast
    assert optional.verdict == Verdict.TOLERANT, optional.rule
    assert MIN_EXPOSED_SAMPLES <= optional.stats["observe"].samples < planned
    assert "the fault caught" in optional.rule and "of the service's packets" in optional.rule
    assert optional.stats["recovery"].ok >= 3
    # And nothing of depdrill is left in the namespace; progress was reported per step
    assert depdrill_leftovers(world) == []
    steps = [(e.test_id, e.step) for e in events]
    assert ("blackhole:dep3.test", "observe") in steps and steps[-1][1] == "verdict"
    assert events[0].message == "[1/2] blackhole:dep3.test: preflight"
    assert events[-1].verdict == Verdict.TOLERANT and events[-1].rule == optional.rule
    assert results.host.kernel == os.uname().release and results.halted is None
    assert Results.from_raw(results.dump()).tests == results.tests


def test_a_dependency_the_service_never_calls_gets_the_whole_window(
    scratch_net: ScratchNet, tmp_path: Path
) -> None:
    # Given a service that calls only .3, and a blackhole on .4 (up, but never called)
    world = build(scratch_net, [f"{scratch_net.address(3)},0.3,fallback"])
    try:
        # When the blackhole on .4 runs
        (result,) = run(suite(world, [blackhole(world, 4)]), RunOptions(journal_dir=tmp_path)).tests
    finally:
        world.stop()
    # Then it is tolerant, but with no evidence to stop early on: the whole window ran,
    # and the rule says that the service never met the fault
    assert result.verdict == Verdict.TOLERANT, result.rule
    assert result.stats["observe"].samples == round(FAST.observe_s / FAST.interval_s)
    assert result.rule.endswith("the service sent nothing into the fault while it was observed")


def test_unhealthy_service_halts_the_suite(world: World, tmp_path: Path) -> None:
    # Given a probe aimed at an address where no service answers
    tests = [blackhole(world, 3), blackhole(world, 4)]
    results = run(suite(world, tests, probe_host=9), RunOptions(journal_dir=tmp_path))
    # Then no fault is applied: the first test is skipped as unhealthy, the rest halted
    first, second = results.tests
    assert (first.verdict, first.reason) == (Verdict.SKIPPED, ErrorReason.UNHEALTHY_BEFORE)
    assert first.fault is None
    assert (second.verdict, second.reason) == (Verdict.SKIPPED, ErrorReason.HALTED)
    assert results.halted is not None and "blackhole:dep3.test" in results.halted


def test_dry_run_shows_rules_and_touches_nothing(world: World, tmp_path: Path) -> None:
    results = run(
        suite(world, [blackhole(world, 3)]), RunOptions(journal_dir=tmp_path, dry_run=True)
    )
    (only,) = results.tests
    assert only.verdict == Verdict.SKIPPED and only.rule == "dry run"
    assert only.fault is not None and only.fault.rules and not only.fault.reverted
    assert any(world.net.address(3) in rule for rule in only.fault.rules)
    assert only.samples == [] and depdrill_leftovers(world) == []


def test_sigterm_reverts_then_skips_the_rest(world: World, tmp_path: Path) -> None:
    # Given a long observation window and a SIGTERM once the fault is on
    tests = [blackhole(world, 4), blackhole(world, 3)]
    long = suite(world, tests).model_copy(
        update={"defaults": Defaults(timing=FAST.model_copy(update={"observe_s": 20}))}
    )
    events: list[ProgressEvent] = []

    def on_progress(event: ProgressEvent) -> None:
        events.append(event)
        if event.step == "observe":
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()

    results = run(long, RunOptions(journal_dir=tmp_path, progress=on_progress))
    # Then the current test is reverted and marked interrupted, the next one skipped
    first, second = results.tests
    assert (first.verdict, first.reason) == (Verdict.ERROR, ErrorReason.INTERRUPTED)
    assert first.fault is not None and first.fault.reverted
    assert (second.verdict, second.reason) == (Verdict.SKIPPED, ErrorReason.INTERRUPTED)
    assert results.halted == "interrupted by SIGTERM"
    assert depdrill_leftovers(world) == []
    # And the default handler is back once the run is over
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_bad_input_is_one_line(scratch_net: ScratchNet, tmp_path: Path) -> None:
    tests = [SuiteTest(id="blackhole:x", fault=BlackholeFault(addresses=["198.19.0.3"]))]
    spec = ServiceSpec(
        name="s", target=Target(netns="ddt-no-such-ns"), probes=[HttpProbe(url="http://x/")]
    )
    # Given a suite whose namespace does not exist / Then one line naming it
    with pytest.raises(TargetError, match="no network namespace named ddt-no-such-ns"):
        run(Suite(service=spec, tests=tests), RunOptions(journal_dir=tmp_path))
    # Given a suite with a command probe, run without --allow-commands / Then refused
    present = Target(netns=scratch_net.add("svc", 2))
    commands = spec.model_copy(update={"target": present, "probes": [CommandProbe(argv=["id"])]})
    with pytest.raises(InputError, match="--allow-commands"):
        run(Suite(service=commands, tests=tests), RunOptions(journal_dir=tmp_path))
    # Given --only matching no test id / Then refused
    with pytest.raises(InputError, match="no test id matches cert:"):
        run(Suite(service=commands, tests=tests), RunOptions(journal_dir=tmp_path, only=["cert:*"]))


def test_latency_on_a_critical_dependency_degrades(scratch_net: ScratchNet, tmp_path: Path) -> None:
    # Given a service whose critical call has a 2 s budget, and 400 ms added to the
    # dependency's replies: each call takes a few round trips longer, but succeeds
    address = scratch_net.address(3)
    world = build(scratch_net, [f"{address},2.0,critical"])
    test = SuiteTest(
        id="latency-400ms:dep3.test",
        dependency="dep3.test",
        fault=LatencyFault(addresses=[address], ports=[8080], protocols=["tcp"], delay_ms=400),
    )
    try:
        # When it runs
        results = run(suite(world, [test]), RunOptions(journal_dir=tmp_path))
    finally:
        world.stop()
    (result,) = results.tests
    # Then the injector this machine offers for latency did it (nfqueue without sch_netem)
    assert result.fault is not None
    assert result.fault.injector == results.host.latency_injector
    assert results.host.injectors[result.fault.injector] == "available"
    # And the proof saw the handshake slowed by at least 80% of the delay
    assert result.proof is not None and result.proof.effective, result.rule
    assert result.proof.target[0].expected == "slower by >= 320 ms"
    # And the service stayed up but broke its latency budget, then recovered: degraded
    assert result.verdict == Verdict.DEGRADED, result.rule
    assert "p95 above 800 ms" in result.rule
    assert result.fault is not None and result.fault.reverted
    assert depdrill_leftovers(world) == []


def test_a_fault_that_does_not_bite_is_an_error_not_a_verdict(world: World, tmp_path: Path) -> None:
    # Given a "dependency" on the namespace's own loopback, which the blackhole's interface
    # hooks never see: the rules go in, but the traffic never passes them
    svc = Target(netns=world.service_ns)
    with tcp_listener("127.0.0.1", svc) as port:
        test = SuiteTest(
            id="blackhole:sidecar.test",
            fault=BlackholeFault(addresses=["127.0.0.1"], ports=[port], protocols=["tcp"]),
        )
        (result,) = run(suite(world, [test]), RunOptions(journal_dir=tmp_path)).tests
    # Then the proof catches it: error, fault-not-effective, with what was measured
    assert (result.verdict, result.reason) == (Verdict.ERROR, ErrorReason.FAULT_NOT_EFFECTIVE)
    assert result.proof is not None and not result.proof.effective
    assert f"tcp connect 127.0.0.1:{port}: expected timeout, got connected" in result.rule
    assert result.fault is not None and result.fault.reverted
    assert "observe" not in [p.name for p in result.phases]
    assert depdrill_leftovers(world) == []


def test_one_transient_failure_gets_a_second_baseline(world: World, tmp_path: Path) -> None:
    # Given a health endpoint (on the host, outside any fault) that fails its first request
    behaviour = Behaviour()
    behaviour.fail_first = 1
    with http_server(behaviour) as port:
        base = suite(world, [blackhole(world, 4)])
        service = base.service.model_copy(
            update={"probes": [HttpProbe(url=f"http://127.0.0.1:{port}/", timeout_s=1)]}
        )
        timing = Defaults(timing=FAST.model_copy(update={"observe_s": 1}))
        flaky = base.model_copy(update={"service": service, "defaults": timing})
        (result,) = run(flaky, RunOptions(journal_dir=tmp_path)).tests
    # Then the suite is not halted: the second baseline judged the service healthy
    assert result.verdict == Verdict.TOLERANT, result.rule
    baseline = [s for s in result.samples if s.phase == "baseline"]
    assert not baseline[0].ok and len(baseline) == 2 * result.stats["baseline"].samples
    assert result.stats["baseline"].success_ratio == 1.0
