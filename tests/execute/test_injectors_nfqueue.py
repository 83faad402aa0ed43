"""nfqueue-latency: packets wait in a release process for the set delay, then go on, in order."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fault_world import FaultWorld, fault_world_fixture  # noqa: F401

from depdrill.execute.injectors.base import InjectorError
from depdrill.execute.injectors.nfqueue_latency import (
    QUEUE_BASE,
    QUEUE_SPAN,
    STANDBY,
    DelayQueue,
    NfqueueLatency,
)
from depdrill.execute.model import ErrorReason
from depdrill.generate.model import BlackholeFault, LatencyFault
from depdrill.netns import Target, entered
from depdrill.testing import ScratchNet


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
        # And the kernel holds the gate and a queue table per family, all owner-flagged,
        # the queue rule on the input hook, with the bypass flag; no iptables rule at all
        ruleset = world.nft_ruleset()
        assert ruleset.count("flags owner") == 3
        assert ruleset.count("type filter hook input") == 3
        assert ruleset.count("meta mark & 0x0dd00000 == 0x0dd00000 queue num") == 2
        assert " bypass" in ruleset and world.tagged_rules() == []
    finally:
        injector.revert(handle)
    # And after revert the tables are gone and connections are fast again
    assert "depdrill" not in world.nft_tables()
    assert world.connect(world.dependency, 7001)[1] < 20


def test_preflight_starts_the_release_process_that_apply_takes(fault_world: FaultWorld) -> None:
    # Given a preflight that passed (the runner's, before the baseline)
    world = fault_world
    injector = NfqueueLatency()
    fault = LatencyFault(addresses=[world.dependency], delay_ms=20)
    assert injector.preflight(fault, world.ctx()) is None
    waiting = STANDBY.spare_pid
    assert waiting is not None
    # When the fault is applied
    handle = injector.apply(fault, world.ctx())
    try:
        # Then the process that waited on standby holds the queue, and none waits any more
        assert handle.delay.pid == waiting and STANDBY.spare_pid is None
        assert world.connect(world.dependency, 7001)[1] >= 20
    finally:
        injector.revert(handle)
    # And a second preflight starts a fresh one
    assert injector.preflight(fault, world.ctx()) is None
    assert STANDBY.spare_pid not in {None, waiting}


def test_send_direction_and_ports_shape_the_rules(fault_world: FaultWorld) -> None:
    # Given a send-path delay on one TCP port
    world = fault_world
    fault = LatencyFault(
        addresses=[world.dependency], ports=[7002], protocols=["tcp"], delay_ms=50, direction="send"
    )
    # When planned
    plan = NfqueueLatency().plan(fault, world.ctx(run_id="shape"))
    # Then an owner-flagged gate marks packets to that port on the output hook
    gate, queue4, queue6 = plan.rules
    assert gate.startswith("table inet depdrill_shape_") and "flags owner;" in gate
    assert "hook output" in gate and "th dport { 7002 }" in gate
    assert f"{world.dependency} timeout " in gate
    # And an owner-flagged queue table per family takes only marked packets, after the gate
    # on the same hook, with the bypass flag
    for family, text in (("ip", queue4), ("ip6", queue6)):
        assert text.startswith(f"table {family} depdrill_shape_") and "flags owner;" in text
        assert "type filter hook output priority 0;" in text
        assert "meta mark & 0x0dd00000 == 0x0dd00000 queue num " in text
        assert text.rstrip().splitlines()[-3].endswith(" bypass")
    queue = int(queue4.split("queue num ")[1].split()[0])
    assert QUEUE_BASE <= queue < QUEUE_BASE + QUEUE_SPAN and f"num {queue} " in queue6
    assert [(o.kind, o.where) for o in plan.objects] == [
        ("nft-table", "inet"),
        ("nft-table", "ip"),
        ("nft-table", "ip6"),
    ]


def test_the_kernel_ends_the_fault_at_its_deadline(fault_world: FaultWorld) -> None:
    # Given a latency fault whose deadline is 0.6 s away, and nobody to revert it in time
    world = fault_world
    injector = NfqueueLatency()
    handle = injector.apply(
        LatencyFault(addresses=[world.dependency], delay_ms=100), world.ctx(seconds=0.6)
    )
    try:
        assert world.connect(world.dependency, 7001)[1] >= 100
        # When the deadline passes (the queue tables are still there)
        time.sleep(0.8)
        assert "queue num" in world.nft_ruleset()
        # Then the gate's set elements have timed out and nothing is delayed any more
        assert world.connect(world.dependency, 7001)[1] < 20
    finally:
        injector.revert(handle)
    assert "depdrill" not in world.nft_tables()


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


def test_held_packets_go_at_once_when_the_fault_is_reverted(fault_world: FaultWorld) -> None:
    # Given 2 s of latency and a connection whose SYN-ACK is being held
    world = fault_world
    injector = NfqueueLatency()
    handle = injector.apply(LatencyFault(addresses=[world.dependency], delay_ms=2000), world.ctx())
    outcome: list[tuple[str, float]] = []
    connecting = threading.Thread(
        target=lambda: outcome.append(world.connect(world.dependency, 7001, timeout=5))
    )
    began = time.monotonic()
    connecting.start()
    time.sleep(0.3)
    # When the fault is reverted
    injector.revert(handle)
    connecting.join()
    # Then the held reply went on at once: connected, long before the 2 s were up, and
    # before a SYN retransmission (1 s) could have stood in for a dropped reply
    assert outcome[0][0] == "connected"
    assert time.monotonic() - began < 0.8
    assert handle.delay.stats["queued"] >= 1


def test_a_held_datagram_is_released_not_dropped_at_revert(
    fault_world: FaultWorld, scratch_net: ScratchNet
) -> None:
    # Given 2 s on datagrams from the dependency's port 7011, and one of them held
    world = fault_world
    receiver, sender = _datagram_pair(world, scratch_net, sending=7011, receiving=7012)
    with receiver, sender:
        receiver.settimeout(1.5)
        injector = NfqueueLatency()
        fault = LatencyFault(addresses=[world.dependency], ports=[7011], delay_ms=2000)
        handle = injector.apply(fault, world.ctx())
        sender.sendto(b"held", (scratch_net.address(2), 7012))
        time.sleep(0.2)
        # When the fault is reverted (its tables deleted: the kernel drops whatever a queue
        # still holds when a hook goes, so the order of the revert is what is tested)
        began = time.monotonic()
        injector.revert(handle)
        # Then the datagram arrives at once: UDP has no retransmission to hide a drop
        assert receiver.recv(16) == b"held"
        assert time.monotonic() - began < 0.2
    assert handle.delay.stats["queued"] == 1


def test_jitter_never_reorders_datagrams(fault_world: FaultWorld, scratch_net: ScratchNet) -> None:
    # Given 30 ms +- 25 ms on datagrams from the dependency's port 7009
    world = fault_world
    receiver, sender = _datagram_pair(world, scratch_net, sending=7009, receiving=7010)
    with receiver, sender:
        receiver.settimeout(2)
        service_address = scratch_net.address(2)
        injector = NfqueueLatency()
        fault = LatencyFault(addresses=[world.dependency], ports=[7009], delay_ms=30, jitter_ms=25)
        handle = injector.apply(fault, world.ctx())
        try:
            # When the dependency sends 60 numbered datagrams in a quick burst
            sent_at = time.monotonic()
            for number in range(60):
                sender.sendto(number.to_bytes(2, "big"), (service_address, 7010))
            arrived = []
            for _ in range(60):
                arrived.append(int.from_bytes(receiver.recv(16), "big"))
            waited = time.monotonic() - sent_at
        finally:
            injector.revert(handle)
    # Then every one arrived, in the order sent, after at least the delay minus the jitter
    assert arrived == list(range(60))
    assert 0.005 <= waited < 0.5
    # And the release process accounted for each, with its scheduling and its lateness
    stats = handle.delay.stats
    assert stats["queued"] == 60 and stats["stamped"] == 60
    assert stats["policy"] in {"fifo:10", "other"}
    assert stats["policy"] == handle.delay.policy
    assert stats["late_p99_us"] is not None and stats["late_p99_us"] <= stats["late_max_us"]


def test_a_queue_someone_else_reads_is_refused(fault_world: FaultWorld) -> None:
    # Given a delay queue bound to a queue number
    world = fault_world
    first = DelayQueue(world.service, QUEUE_BASE + QUEUE_SPAN - 1, 0.01, 0.0)
    try:
        # When a second one asks for the same queue
        with pytest.raises(InjectorError) as refused:
            DelayQueue(world.service, QUEUE_BASE + QUEUE_SPAN - 1, 0.01, 0.0)
        # Then it is refused with the kernel's reason, and the first one is untouched
        assert refused.value.reason == ErrorReason.APPLY_FAILED
        assert (
            "cannot bind NFQUEUE" in refused.value.message
            and "bound by another" in refused.value.message
        )
        assert os.waitpid(first.pid, os.WNOHANG) == (0, 0)
    finally:
        first.close()
    assert first.stats["queued"] == 0


def _datagram_pair(
    world: FaultWorld, scratch_net: ScratchNet, sending: int, receiving: int
) -> tuple[socket.socket, socket.socket]:
    """A UDP socket bound in the service's namespace, and one in the dependency's."""
    with entered(world.service):
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with entered(Target(netns=scratch_net.namespaces[1])):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("0.0.0.0", receiving))
        sender.bind((world.dependency, sending))
    except OSError:
        receiver.close()
        sender.close()
        raise
    return receiver, sender


HOLDER = """
import sys
from depdrill.execute.injectors.nfqueue_latency import DelayQueue
from depdrill.netns import Target
queue = DelayQueue(Target(netns=sys.argv[1]), int(sys.argv[2]), 0.5, 0.0)
print(queue.pid, flush=True)
sys.stdin.read()
"""


def test_the_release_process_dies_with_the_process_that_applied_it(
    fault_world: FaultWorld,
) -> None:
    # Given a process holding a delay queue (as a runner does), with its release process
    world = fault_world
    queue = QUEUE_BASE + QUEUE_SPAN - 2
    holder = subprocess.Popen(
        [sys.executable, "-P", "-c", HOLDER, world.service.netns or "", str(queue)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        release_pid = int(holder.stdout.readline())
        assert _bound_queues(world) == [queue]
        # When that process is SIGKILLed
        holder.kill()
        holder.wait()
        # Then its release process ends within a second, and the queue is unbound
        give_up = time.monotonic() + 1.0
        while _running(release_pid) and time.monotonic() < give_up:
            time.sleep(0.01)
        assert not _running(release_pid)
        assert _bound_queues(world) == []
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.stdout.close()


def _running(pid: int) -> bool:
    """True until the process has exited (a zombie waiting for init to reap it has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def _bound_queues(world: FaultWorld) -> list[int]:
    listing = subprocess.run(
        [*world.service.exec_prefix(), "cat", "/proc/net/netfilter/nfnetlink_queue"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if line.strip()]
