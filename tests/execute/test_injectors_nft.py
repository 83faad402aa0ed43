"""nft-blackhole: a silent drop, both directions, in a table the kernel removes with its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from fault_world import FaultWorld, fault_world_fixture  # noqa: F401

from depdrill.execute.injectors.base import FaultContext, InjectorError
from depdrill.execute.injectors.nft_blackhole import NftBlackhole
from depdrill.execute.model import ErrorReason
from depdrill.generate.model import BlackholeFault, DnsBlackholeFault, Fault, LatencyFault
from depdrill.netns import Target


def test_blackhole_drops_silently_and_counts(fault_world: FaultWorld) -> None:
    # Given a blackhole on the dependency, applied in-process
    world = fault_world
    injector = NftBlackhole()
    fault = BlackholeFault(addresses=[world.dependency])
    assert injector.preflight(fault, world.ctx()) is None
    handle = injector.apply(fault, world.ctx())
    try:
        before = handle.matched()
        # When the service sends to it and connects to it
        udp = world.send_udp(world.dependency, 7001)
        tcp, tcp_ms = world.connect(world.dependency, 7001, timeout=0.4)
        control, _ = world.connect(world.control, 7001)
        canary, canary_ms = world.connect(world.dependency, 7001, source=world.canary)
        time.sleep(0.02)
        # Then UDP succeeds locally (as to a dead host), TCP times out, the counter rose
        assert udp == "sent"
        assert tcp == "timeout" and tcp_ms >= 390
        assert control == "connected"
        # And a sibling namespace still reaches the same dependency at full speed
        assert canary == "connected" and canary_ms < 20
        # (a late packet of the fixture's warm-up may already sit in the counter)
        assert before is not None
        assert (handle.matched() or 0) >= before + 2
        assert handle.table in world.nft_tables()
    finally:
        injector.revert(handle)
    # And after revert traffic flows and the table is gone
    assert world.connect(world.dependency, 7001)[0] == "connected"
    assert "depdrill" not in world.nft_tables()


def test_blackhole_with_ports_spares_other_ports(fault_world: FaultWorld) -> None:
    # Given a blackhole on one TCP port of the dependency
    world = fault_world
    injector = NftBlackhole()
    handle = injector.apply(
        BlackholeFault(addresses=[world.dependency], ports=[7002], protocols=["tcp"]),
        world.ctx(),
    )
    try:
        # Then that port times out and its neighbour answers
        assert world.connect(world.dependency, 7002, timeout=0.3)[0] == "timeout"
        assert world.connect(world.dependency, 7003)[0] == "connected"
    finally:
        injector.revert(handle)


def test_dns_blackhole_silences_port_53_only(fault_world: FaultWorld) -> None:
    # Given the dependency acts as a resolver and its port 53 is blackholed
    world = fault_world
    injector = NftBlackhole()
    fault = DnsBlackholeFault(resolvers=[world.dependency])
    assert injector.preflight(fault, world.ctx()) is None
    handle = injector.apply(fault, world.ctx())
    try:
        # When the service queries it over TCP port 53, and talks to another port
        # Then port 53 is dead (a timeout, not a refusal) and other ports still answer
        assert world.connect(world.dependency, 53, timeout=0.3)[0] == "timeout"
        assert world.connect(world.dependency, 7001)[0] == "connected"
        assert "th dport { 53 }" in handle.rules[0]
    finally:
        injector.revert(handle)


def test_new_addresses_join_the_set_and_protected_ones_are_refused(
    fault_world: FaultWorld,
) -> None:
    # Given a blackhole on the control host, then the dependency's address resolved anew
    world = fault_world
    injector = NftBlackhole()
    handle = injector.apply(
        BlackholeFault(addresses=[world.control]), world.ctx(protected=frozenset({"198.19.0.9"}))
    )
    try:
        assert world.connect(world.dependency, 7001)[0] == "connected"
        added = handle.add_addresses([world.dependency, world.control])
        # Then only the new address is added and it is dropped from then on
        assert added == [world.dependency]
        assert world.connect(world.dependency, 7001, timeout=0.3)[0] == "timeout"
        # And a protected address never joins the set
        with pytest.raises(InjectorError) as refused:
            handle.add_addresses(["198.19.0.9"])
        assert refused.value.reason == ErrorReason.PREFLIGHT_REFUSED
    finally:
        injector.revert(handle)


def test_dry_run_rules_are_the_ruleset_nft_accepts(fault_world: FaultWorld) -> None:
    # Given the rules a dry run prints for a blackhole with IPv4 and IPv6 addresses
    world = fault_world
    fault = BlackholeFault(addresses=[world.dependency, "fd00:dd::3"], ports=[443])
    rules = NftBlackhole().rules(fault, world.ctx())
    text = rules[0]
    # Then they hold the owner flag, both hooks, both families, a timeout per element
    assert "flags owner;" in text
    assert "hook egress" in text and "hook ingress" in text
    assert f"{world.dependency} timeout " in text and "fd00:dd::3 timeout " in text
    # And nft itself accepts them as they are (check mode: nothing is installed)
    done = subprocess.run(
        [*world.service.exec_prefix(), "nft", "-c", "-f", "-"],
        input=text,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "depdrill" not in world.nft_tables()


def test_preflight_refuses_what_would_catch_too_much(fault_world: FaultWorld) -> None:
    world = fault_world
    injector = NftBlackhole()
    ctx = world.ctx(protected=frozenset({world.control}))
    cases: dict[str, Fault] = {
        "no address": BlackholeFault.model_construct(
            addresses=[], ports=[], protocols=["tcp", "udp"]
        ),
        "probe path": BlackholeFault(addresses=[world.control]),
        "port 53": BlackholeFault(addresses=[world.dependency], ports=[53]),
        "latency": LatencyFault(addresses=[world.dependency], delay_ms=10),
    }
    for why, fault in cases.items():
        # When each is preflighted
        refused = injector.preflight(fault, ctx)
        # Then it is refused, with the reason
        assert refused is not None, why
        assert refused.reason == ErrorReason.PREFLIGHT_REFUSED, why
    host = FaultContext(
        target=Target(pid=os.getpid()), run_id="t1", test_id="x", deadline=ctx.deadline
    )
    refused = injector.preflight(BlackholeFault(addresses=[world.dependency]), host)
    assert refused is not None and "own network namespace" in refused.message


HOLDER = """
import sys, time
from datetime import timedelta
from depdrill.artifact import utcnow
from depdrill.generate.model import BlackholeFault
from depdrill.execute.injectors.base import FaultContext
from depdrill.execute.injectors.nft_blackhole import NftBlackhole
from depdrill.netns import Target
ctx = FaultContext(target=Target(netns=sys.argv[1]), run_id="own", test_id="x",
                   deadline=utcnow() + timedelta(seconds=60))
handle = NftBlackhole().apply(BlackholeFault(addresses=[sys.argv[2]]), ctx)
print(handle.table, flush=True)
time.sleep(60)
"""


def test_owner_table_goes_when_its_process_is_sigkilled(fault_world: FaultWorld) -> None:
    # Given a child process that applied a blackhole and holds it
    world = fault_world
    assert world.service.netns is not None
    child = subprocess.Popen(
        [sys.executable, "-P", "-c", HOLDER, world.service.netns, world.dependency],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    with child.stdout:
        table = child.stdout.readline().strip()
    assert table in world.nft_tables()
    assert world.connect(world.dependency, 7001, timeout=0.3)[0] == "timeout"
    # When it is killed without a chance to clean up
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # Then the kernel has removed its table, and traffic flows
    deadline = time.monotonic() + 2
    while table in world.nft_tables() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert table not in world.nft_tables()
    assert world.connect(world.dependency, 7001)[0] == "connected"


def test_revert_of_a_foreign_handle_is_refused() -> None:
    with pytest.raises(TypeError):
        NftBlackhole().revert(object())
