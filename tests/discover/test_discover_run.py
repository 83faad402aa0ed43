"""The live capture's hot loop and what keeps it out of the service's way.

The inline path of run._feed_live against the general one (decode_ip, then Dissector.event)
on generated and mutated packets; the kernel filter in a real namespace (SYNs the service
accepts and loopback never reach the ring, SYNs it sends do); the thread's scheduling.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import threading
import time
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from depdrill.discover import capture as capture_module
from depdrill.discover.capture import LiveCapture, Priority
from depdrill.discover.dissect import Dissector, PacketEvent
from depdrill.discover.ebpf import EbpfCapture
from depdrill.discover.nflog import NflogCapture
from depdrill.discover.packets import decode_ip
from depdrill.discover.run import DiscoverOptions, _feed_live, run
from depdrill.netns import Target
from depdrill.testing import ScratchNet

SERVICE, RESOLVER = "198.19.1.10", "198.19.1.53"


class _Recorder:
    """Stands in for the GraphBuilder: keeps every event it is given."""

    def __init__(self) -> None:
        self.events: list[PacketEvent] = []

    def add(self, event: PacketEvent) -> None:
        self.events.append(event)


def _dns_wires(rng: random.Random) -> list[bytes]:
    wires = []
    for i in range(40):
        name = f"n{rng.randrange(20)}.x.test"
        query = dns.message.make_query(name, "A", id=rng.randrange(65536))
        response = dns.message.make_response(query)
        if i % 3:
            response.answer.append(dns.rrset.from_text(name + ".", 30, "IN", "A", "198.19.1.5"))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        wires += [query.to_wire(), response.to_wire()]
    return wires


def _packets(rng: random.Random) -> list[bytes]:
    """DNS both ways, other UDP, TCP, IPv6, and the same bytes mutated and cut short."""
    base: list[bytes] = []
    for wire in _dns_wires(rng):
        sport = rng.randrange(1024, 65536)
        base.append(bytes(IP(src=SERVICE, dst=RESOLVER) / UDP(sport=sport, dport=53) / wire))
        base.append(bytes(IP(src=RESOLVER, dst=SERVICE) / UDP(sport=53, dport=sport) / wire))
    base += [
        bytes(IP(src=SERVICE, dst="198.19.1.20") / UDP(sport=4000, dport=8125) / b"hits:1|c"),
        bytes(IP(src=SERVICE, dst=RESOLVER) / UDP(sport=4000, dport=53)),  # no payload
        bytes(IP(src=SERVICE, dst="198.19.1.20") / TCP(sport=4000, dport=443, flags="S")),
        bytes(IP(src=SERVICE, dst=RESOLVER, flags="MF") / UDP(sport=4000, dport=53) / (b"x" * 20)),
        bytes(IPv6(src="::ffff:198.19.1.10", dst="::1") / UDP(sport=4000, dport=53) / (b"y" * 12)),
        bytes(IP(src=SERVICE, dst=RESOLVER, options=b"\x01\x01\x01\x00") / UDP(dport=53) / b"z"),
    ]
    packets = list(base)
    for _ in range(6000):
        packet = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 3)):
            at = rng.choice([0, 2, 3, 6, 7, 9, 20, 21, 22, 23, rng.randrange(len(packet))])
            if at < len(packet):
                packet[at] = rng.choice([0, 0x45, 0x46, 17, 6, 53, 0xFF, rng.randrange(256)])
        if rng.random() < 0.3:
            del packet[rng.randrange(len(packet) + 1) :]
        packets.append(bytes(packet))
    return packets


def test_the_inline_path_makes_exactly_the_events_of_the_general_path() -> None:
    # Given real and mutated IPv4/IPv6 packets, DNS and not, in time order
    packets = _packets(random.Random(7))
    frames = [(1000.0 + i / 1000, packet) for i, packet in enumerate(packets)]
    # When the live loop reads them, and the general path reads them one by one
    inline, inline_dissector = _Recorder(), Dissector()
    _feed_live(inline, inline_dissector, frames)  # type: ignore[arg-type]
    general, general_dissector = [], Dissector()
    for t, packet in frames:
        seg = decode_ip(packet)
        if seg is not None:
            general.append(general_dissector.event(t, seg))
    # Then both give the same events and the same message and malformed counts
    assert inline.events == general
    assert len(general) > 2000 and sum(bool(e.dns) for e in general) > 500
    assert inline_dissector.dns_messages == general_dissector.dns_messages
    assert inline_dissector.malformed == general_dissector.malformed > 0


@pytest.mark.parametrize(
    "tap", [LiveCapture, NflogCapture, EbpfCapture], ids=["packet", "nflog", "ebpf"]
)
def test_the_filter_keeps_accepted_syns_and_loopback_in_the_kernel(
    scratch_net: ScratchNet, tap: type[LiveCapture] | type[NflogCapture] | type[EbpfCapture]
) -> None:
    # Given a service namespace, a peer, and a capture of the service (either tap)
    svc, peer = scratch_net.add("svc", 10), scratch_net.add("peer", 20)
    client = (
        "import socket, sys\n"
        "for host, port in ((sys.argv[1], int(sys.argv[2])), ('127.0.0.1', 5999)):\n"
        "    s = socket.socket(); s.settimeout(0.5)\n"
        "    try: s.connect((host, port))\n"
        "    except OSError: pass\n"
        "    s.close()\n"
    )
    with tap.open(Target(netns=svc)) as capture:
        stop = threading.Event()
        seen: list[bytes] = []
        reader = threading.Thread(
            target=lambda: seen.extend(p for _, p in capture.frames(30, stop, background=True))
        )
        reader.start()
        try:
            # When the peer connects to the service, and the service to the peer and to lo
            scratch_net.exec(peer, "python3", "-c", client, scratch_net.address(10), "7001")
            scratch_net.exec(svc, "python3", "-c", client, scratch_net.address(20), "7002")
            time.sleep(0.2)
        finally:
            stop.set()
            reader.join()
    syns = [seg for seg in map(decode_ip, seen) if seg is not None and seg.syn]
    # Then only the service's own attempt to the peer reached depdrill
    assert [(s.src, s.dst, s.dport) for s in syns] == [
        (scratch_net.address(10), scratch_net.address(20), 7002)
    ]
    assert capture.packet_count == len(seen)


def test_the_loop_runs_at_sched_idle_and_gives_the_thread_back(scratch_net: ScratchNet) -> None:
    # Given a thread at its normal scheduling, running a live discovery
    svc = scratch_net.add("svc", 10)
    policies: list[int] = []
    stop, ready = threading.Event(), threading.Event()

    def discover() -> None:
        run(DiscoverOptions(target=Target(netns=svc), duration_s=30), stop, ready)
        policies.append(os.sched_getscheduler(0))

    thread = threading.Thread(target=discover)
    thread.start()
    ready.wait(10)
    time.sleep(0.3)  # the loop has found the ring empty: background now
    # When we look at the thread's policy mid-capture, and after it ends
    during = os.sched_getscheduler(thread.native_id or 0)
    stop.set()
    thread.join()
    # Then it was SCHED_IDLE while capturing, and its own policy again afterwards
    assert during == os.SCHED_IDLE
    assert policies == [os.SCHED_OTHER]


def test_priority_lowers_and_restores_the_calling_thread() -> None:
    # Given this thread at SCHED_OTHER
    priority = Priority()
    try:
        # When lowered, Then it is SCHED_IDLE; when restored, its own policy again
        priority.lower()
        assert os.sched_getscheduler(0) == os.SCHED_IDLE and priority.background
        priority.lower()  # idempotent
        priority.restore()
        assert os.sched_getscheduler(0) == os.SCHED_OTHER and not priority.background
    finally:
        priority.restore()


SEND_UDP = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.sendto(b'hits:1|c', (sys.argv[1], int(sys.argv[2]))); s.close()\n"
)


def _reading(capture: LiveCapture) -> tuple[threading.Thread, threading.Event, list[bytes]]:
    """A thread reading the capture at SCHED_IDLE, as discovery does, into a list."""
    stop, seen = threading.Event(), []
    reader = threading.Thread(
        target=lambda: seen.extend(p for _, p in capture.frames(30, stop, background=True))
    )
    reader.start()
    return reader, stop, seen


def _udp_destinations(seen: list[bytes]) -> list[tuple[str, int]]:
    segments = [seg for seg in map(decode_ip, seen) if seg is not None and seg.proto == "udp"]
    return [(seg.dst, seg.dport) for seg in segments]


def test_one_interface_is_hooked_alone_and_several_are_hooked_together(
    scratch_net: ScratchNet,
) -> None:
    # Given a service namespace with one interface, and another with two more (a veth pair
    # inside it: this kernel has no dummy driver), one of them routing to .201
    one, two = scratch_net.add("one", 10), scratch_net.add("two", 11)
    subnet = scratch_net.address(0).rsplit(".", 1)[0]
    for argv in (
        ("link", "add", "v0", "type", "veth", "peer", "name", "v1"),
        ("addr", "add", f"{subnet}.200/32", "dev", "v0"),
        ("link", "set", "v0", "up"),
        ("link", "set", "v1", "up"),
        ("route", "add", f"{subnet}.201/32", "dev", "v0"),
        ("neigh", "add", f"{subnet}.201", "lladdr", "02:00:00:00:02:01", "dev", "v0"),
    ):
        scratch_net.exec(two, "ip", *argv)
    # When each is captured and the second sends UDP out of both interfaces
    with LiveCapture.open(Target(netns=one)) as alone:
        hooked = alone._sock.getsockname()[0]
    with LiveCapture.open(Target(netns=two)) as both:
        reader, stop, seen = _reading(both)
        try:
            scratch_net.exec(two, "python3", "-c", SEND_UDP, scratch_net.host_address, "8125")
            scratch_net.exec(two, "python3", "-c", SEND_UDP, f"{subnet}.201", "8126")
            time.sleep(0.2)
        finally:
            stop.set()
            reader.join()
    # Then the first socket is bound to eth0 (loopback never reaches its tap at all)
    assert alone.bound and hooked == "eth0" and alone.interfaces == ["eth0"]
    # And the second hooks the whole namespace and sees what left by either interface
    assert not both.bound and both.interfaces == ["eth0", "v0", "v1"]
    assert set(_udp_destinations(seen)) == {
        (scratch_net.host_address, 8125),
        (f"{subnet}.201", 8126),
    }


def _cpu_ticks(thread: threading.Thread) -> int:
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1]
    utime, stime = fields.split()[11:13]
    return int(utime) + int(stime)


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "recv"])
def test_the_capture_outlives_its_interface_going_down_and_up(
    scratch_net: ScratchNet, monkeypatch: pytest.MonkeyPatch, ring: bool
) -> None:
    # Given a capture bound to the service's one interface (from its ring, or without one)
    if not ring:
        monkeypatch.setattr(capture_module, "_Ring", _no_ring)
    svc, peer = scratch_net.add("svc", 10), scratch_net.address(20)
    scratch_net.add("peer", 20)
    with LiveCapture.open(Target(netns=svc)) as capture:
        assert capture.bound and (capture._ring is not None) == ring
        reader, stop, seen = _reading(capture)
        try:
            # When the interface goes down (the socket gets ENETDOWN) for half a second
            scratch_net.exec(svc, "ip", "link", "set", "eth0", "down")
            time.sleep(0.1)
            before = _cpu_ticks(reader)
            time.sleep(0.5)
            spent = _cpu_ticks(reader) - before
            # And comes back up, and the service sends a datagram
            scratch_net.exec(svc, "ip", "link", "set", "eth0", "up")
            scratch_net.exec(svc, "python3", "-c", SEND_UDP, peer, "8125", check=False)
            time.sleep(0.3)
            scratch_net.exec(svc, "python3", "-c", SEND_UDP, peer, "8126")
            time.sleep(0.2)
        finally:
            stop.set()
            reader.join()
    # Then the loop waited quietly meanwhile (no spinning on the error), and sees traffic again
    assert spent <= 5, f"{spent} ticks of CPU in 0.5 s with the interface down"
    assert (peer, 8126) in _udp_destinations(seen)


def _no_ring(sock: socket.socket) -> None:
    raise OSError("no TPACKET_V3 here")


def test_under_light_load_the_background_loop_reads_blocks_in_batches(
    scratch_net: ScratchNet,
) -> None:
    # Given a background capture of a service sending a datagram every 10 ms for 1.5 s
    svc = scratch_net.add("svc", 10)
    trickle = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for i in range(150):\n"
        "    s.sendto(b'%d' % i, (sys.argv[1], 8125)); time.sleep(0.01)\n"
        "s.close()\n"
    )
    arrivals: list[float] = []
    with LiveCapture.open(Target(netns=svc)) as capture:
        stop = threading.Event()

        def consume() -> None:
            for _ in capture.frames(30, stop, background=True):
                arrivals.append(time.monotonic())

        reader = threading.Thread(target=consume)
        reader.start()
        try:
            # When the kernel hands over a block every 50 ms, each a sliver full
            scratch_net.exec(svc, "python3", "-c", trickle, scratch_net.host_address)
        finally:
            stop.set()
            reader.join()
    # Then every datagram arrives, read while the capture ran, but in a few batches rather
    # than one per block (some 30 blocks, 50 ms apart: without batching, 30 bursts)
    bursts = 1 + sum(b - a > 0.03 for a, b in itertools.pairwise(arrivals))
    assert len(arrivals) == 150
    assert 2 <= bursts <= 10, f"{bursts} batches of {capture_module.RING_RETIRE_MS} ms blocks"
