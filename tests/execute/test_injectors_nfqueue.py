"""nfqueue-latency: packets wait in this process for the set delay, then go on, in order."""

from __future__ import annotations

import statistics
import time

import pytest
from fault_world import FaultWorld, fault_world_fixture  # noqa: F401

from depdrill.execute.injectors.nfqueue_latency import (
    QUEUE_BASE,
    QUEUE_SPAN,
    NfqueueLatency,
)
from depdrill.execute.model import ErrorReason
from depdrill.generate.model import BlackholeFault, LatencyFault


def test_added_rtt_is_the_delay_within_a_few_ms(fault_world: FaultWorld) -> None:
    # Given 100 ms of latency on the dependency's replies
    world = fault_world
    injector = NfqueueLatency()
    fault = LatencyFault(addresses=[world.dependency], delay_ms=100)
    assert injector.preflight(fault, world.ctx()) is None
    base = statistics.median(world.connect(world.dependency, 7001)[1] for _ in range(5))
    handle = injector.apply(fault, world.ctx())
    try:
        # When the service opens connections to it and to the control host
        slowed = [world.connect(world.dependency, 7001) for _ in range(15)]
        control = world.connect(world.control, 7001)
        canary = [world.connect(world.dependency, 7001, source=world.canary) for _ in range(5)]
        # Then every handshake waited the delay, hardly more, and the control did not
        assert all(outcome == "connected" for outcome, _ in slowed)
        times = [ms for _, ms in slowed]
        assert min(times) >= 100
        assert statistics.median(times) < 100 + base + 3
        assert control[0] == "connected" and control[1] < 20
        # And a sibling namespace talking to the same dependency is not delayed at all
        assert all(outcome == "connected" and ms < 20 for outcome, ms in canary)
        assert (handle.matched() or 0) >= 15
        assert len(world.tagged_rules()) == 2  # tcp and udp, on INPUT
        assert all("-A INPUT" in r and "--queue-bypass" in r for r in world.tagged_rules())
    finally:
        injector.revert(handle)
    # And after revert the rules are gone and connections are fast again
    assert world.tagged_rules() == []
    assert world.connect(world.dependency, 7001)[1] < 20


def test_send_direction_and_ports_shape_the_rules(fault_world: FaultWorld) -> None:
    # Given a send-path delay on one TCP port
    world = fault_world
    fault = LatencyFault(
        addresses=[world.dependency], ports=[7002], protocols=["tcp"], delay_ms=50, direction="send"
    )
    # When planned
    plan = NfqueueLatency().plan(fault, world.ctx(run_id="shape"))
    # Then an owner-flagged gate marks packets to that port on the output hook
    gate, rule = plan.rules
    assert gate.startswith("table inet depdrill_shape_") and "flags owner;" in gate
    assert "hook output" in gate and "th dport { 7002 }" in gate
    assert f"{world.dependency} timeout " in gate
    # And one OUTPUT rule takes only marked packets, tagged, with the bypass flag
    assert rule.startswith("iptables-legacy -t mangle -I OUTPUT -d " + world.dependency)
    assert "--dports 7002" in rule and "--comment depdrill:shape:" in rule
    assert "-m mark --mark 0xdd00000/0xdd00000" in rule and rule.endswith("--queue-bypass")
    queue = int(rule.split("--queue-num ")[1].split()[0])
    assert QUEUE_BASE <= queue < QUEUE_BASE + QUEUE_SPAN
    assert [o.kind for o in plan.objects] == ["nft-table", "iptables-rule"]


def test_the_kernel_ends_the_fault_at_its_deadline(fault_world: FaultWorld) -> None:
    # Given a latency fault whose deadline is 0.6 s away, and nobody to revert it in time
    world = fault_world
    injector = NfqueueLatency()
    handle = injector.apply(
        LatencyFault(addresses=[world.dependency], delay_ms=100), world.ctx(seconds=0.6)
    )
    try:
        assert world.connect(world.dependency, 7001)[1] >= 100
        # When the deadline passes (the queue rule is still there)
        time.sleep(0.8)
        assert world.tagged_rules()
        # Then the gate's set elements have timed out and nothing is delayed any more
        assert world.connect(world.dependency, 7001)[1] < 20
    finally:
        injector.revert(handle)
    assert world.tagged_rules() == [] and "depdrill" not in world.nft_tables()


def test_jitter_varies_the_delay_within_its_bounds(fault_world: FaultWorld) -> None:
    # Given 40 ms +- 20 ms on the dependency
    world = fault_world
    injector = NfqueueLatency()
    handle = injector.apply(
        LatencyFault(addresses=[world.dependency], delay_ms=40, jitter_ms=20), world.ctx()
    )
    try:
        times = [world.connect(world.dependency, 7001)[1] for _ in range(12)]
    finally:
        injector.revert(handle)
    # Then each handshake waited between 20 and 60 ms (plus a little), and they vary
    assert all(20 <= t < 63 for t in times), times
    assert max(times) - min(times) > 2


def test_preflight_refuses_other_faults_and_port_53(fault_world: FaultWorld) -> None:
    world = fault_world
    injector = NfqueueLatency()
    blackhole = injector.preflight(BlackholeFault(addresses=[world.dependency]), world.ctx())
    dns = injector.preflight(
        LatencyFault(addresses=[world.dependency], ports=[53], delay_ms=10), world.ctx()
    )
    assert blackhole is not None and blackhole.reason == ErrorReason.PREFLIGHT_REFUSED
    assert dns is not None and "port 53" in dns.message


def test_revert_of_a_foreign_handle_is_refused() -> None:
    with pytest.raises(TypeError):
        NfqueueLatency().revert(object())
