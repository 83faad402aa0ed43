"""A canary beside the service: faults on the service never touch a sibling's traffic.

The canary is another namespace on the same bridge that talks to the same dependency, the
whole time a blackhole and a latency fault are applied to the service (through the real
injectors and a FaultSession), reverted, and both at once: every one of its numbered
requests must come back, in order, at its usual round-trip time.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest

from depdrill.artifact import utcnow
from depdrill.execute.injectors.base import FaultContext
from depdrill.execute.injectors.nfqueue_latency import NfqueueLatency
from depdrill.execute.injectors.nft_blackhole import NftBlackhole
from depdrill.execute.safety import FaultSession
from depdrill.generate.model import BlackholeFault, LatencyFault
from depdrill.netns import Target, entered
from depdrill.testing import ScratchNet

ECHO_PORT = 7011
DELAY_MS = 400
PACE_S = 0.002  # ~500 requests/s from the canary, UDP and TCP together
REPLY_TIMEOUT_S = 1.5


@dataclass
class Echoes:
    """Round trips of one numbered request loop: RTTs in ms, and what went wrong."""

    rtts: list[float] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)


@dataclass
class EchoWorld:
    service: Target
    canary: Target
    dependency: str
    stop: threading.Event = field(default_factory=threading.Event)


def _echo_server(listeners: list[socket.socket], stop: threading.Event) -> None:
    """Answers UDP datagrams and TCP lines with themselves, from one thread."""
    with selectors.DefaultSelector() as selector:
        for listener in listeners:
            selector.register(listener, selectors.EVENT_READ)
        streams: list[socket.socket] = []
        try:
            while not stop.is_set():
                for key, _ in selector.select(0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    with contextlib.suppress(OSError):
                        if sock.type == socket.SOCK_DGRAM:
                            data, peer = sock.recvfrom(2048)
                            sock.sendto(data, peer)
                        elif sock in listeners:
                            conn, _ = sock.accept()
                            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                            streams.append(conn)
                            selector.register(conn, selectors.EVENT_READ)
                        else:
                            data = sock.recv(4096)
                            if data:
                                sock.sendall(data)
                            else:
                                selector.unregister(sock)
                                sock.close()
        finally:
            for conn in streams:
                conn.close()


@pytest.fixture(name="echo_world")
def echo_world_fixture(scratch_net: ScratchNet) -> Iterator[EchoWorld]:
    """Given a service and a canary on one bridge, and a dependency that echoes both."""
    net = scratch_net
    service, dependency, canary = net.add("s", 2), net.add("d", 3), net.add("k", 4)
    world = EchoWorld(Target(netns=service), Target(netns=canary), net.address(3))
    with entered(Target(netns=dependency)):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket()
    with udp, tcp:
        udp.bind((world.dependency, ECHO_PORT))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((world.dependency, ECHO_PORT))
        tcp.listen(16)
        server = threading.Thread(target=_echo_server, args=([udp, tcp], world.stop), daemon=True)
        server.start()
        try:
            yield world
        finally:
            world.stop.set()
            server.join()


def _udp_round_trip(sock: socket.socket, seq: int, address: str) -> float | None:
    """One numbered datagram and its echo: RTT in ms, None if it never came back."""
    began = time.perf_counter()
    sock.sendto(seq.to_bytes(8, "big"), (address, ECHO_PORT))
    while True:
        left = REPLY_TIMEOUT_S - (time.perf_counter() - began)
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data = sock.recv(64)
        except TimeoutError:
            return None
        # A late echo of an earlier request would have been counted lost already.
        if int.from_bytes(data, "big") == seq:
            return (time.perf_counter() - began) * 1000


def _canary_loop(world: EchoWorld, stop: threading.Event, udp: Echoes, tcp: Echoes) -> None:
    with entered(world.canary):
        dgram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stream = socket.create_connection((world.dependency, ECHO_PORT), timeout=REPLY_TIMEOUT_S)
    with dgram, stream:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = stream.makefile("rb")
        with reader:
            seq = 0
            while not stop.is_set():
                seq += 1
                rtt = _udp_round_trip(dgram, seq, world.dependency)
                if rtt is None:
                    udp.lost.append(seq)
                else:
                    udp.rtts.append(rtt)
                began = time.perf_counter()
                stream.sendall(f"{seq}\n".encode())
                try:
                    line = reader.readline()
                except TimeoutError:
                    tcp.lost.append(seq)
                    return  # the stream is out of step now; the loss is the finding
                if line != f"{seq}\n".encode():
                    tcp.wrong.append(f"sent {seq}, got {line!r}")
                    return
                tcp.rtts.append((time.perf_counter() - began) * 1000)
                time.sleep(PACE_S)


def _service_udp_rtt(world: EchoWorld, timeout_s: float) -> float | None:
    with entered(world.service):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        began = time.perf_counter()
        sock.sendto(b"service", (world.dependency, ECHO_PORT))
        sock.settimeout(timeout_s)
        try:
            sock.recv(64)
        except TimeoutError:
            return None
        return (time.perf_counter() - began) * 1000


def test_a_sibling_namespace_sees_no_drop_and_no_delay(
    echo_world: EchoWorld, tmp_path: Path
) -> None:
    # Given a canary beside the service, sending numbered UDP and TCP echoes to the dependency
    world = echo_world
    ctx = FaultContext(
        target=world.service,
        run_id="canary",
        test_id="canary",
        deadline=utcnow() + timedelta(seconds=30),
    )
    blackhole = BlackholeFault(addresses=[world.dependency])
    latency = LatencyFault(addresses=[world.dependency], delay_ms=DELAY_MS)
    udp, tcp = Echoes(), Echoes()
    stop = threading.Event()
    # ARP and the first connection settle before the measured part starts.
    assert _service_udp_rtt(world, 1.0) is not None
    canary = threading.Thread(target=_canary_loop, args=(world, stop, udp, tcp), daemon=True)
    canary.start()
    seen: dict[str, float | None] = {}
    try:
        time.sleep(0.5)
        baseline = len(udp.rtts)
        # When the service gets a blackhole, then a latency fault, then both at once
        with FaultSession("canary", world.service, tmp_path) as session:
            held = session.apply(NftBlackhole(), blackhole, ctx)
            seen["blackhole"] = _service_udp_rtt(world, 0.5)
            time.sleep(1.0)
            session.revert(held)
            held = session.apply(NfqueueLatency(), latency, ctx)
            seen["latency"] = _service_udp_rtt(world, 2.0)
            time.sleep(1.0)
            both = [
                session.apply(NfqueueLatency(), latency, ctx),
                session.apply(NftBlackhole(), blackhole, ctx),
            ]
            session.revert(held)
            seen["both"] = _service_udp_rtt(world, 0.5)
            time.sleep(1.0)
            for handle in both:
                session.revert(handle)
        time.sleep(0.3)
    finally:
        stop.set()
        canary.join()
    # Then the faults bit the service: no echo through the blackhole, a slow one through delay
    assert seen["blackhole"] is None and seen["both"] is None, seen
    latency_seen = seen["latency"]
    assert latency_seen is not None and latency_seen >= DELAY_MS, seen
    # And the canary lost nothing, got every echo in order, and never waited for the delay
    assert udp.lost == [] and tcp.lost == [] and tcp.wrong == [], (udp.lost, tcp.lost, tcp.wrong)
    assert len(udp.rtts) > baseline + 300 and len(tcp.rtts) == len(udp.rtts)
    for echoes in (udp, tcp):
        ordered = sorted(echoes.rtts)
        p99 = ordered[len(ordered) * 99 // 100]
        assert p99 < 20 and max(ordered) < DELAY_MS / 4, (statistics.median(ordered), p99)
