"""The live capture's hot loop and what keeps it out of the service's way.

The inline path of run._feed_live against the general one (decode_ip, then Dissector.event)
on generated and mutated packets; the kernel filter in a real namespace (SYNs the service
accepts and loopback never reach the ring, SYNs it sends do); the thread's scheduling.
"""

from __future__ import annotations

import os
import random
import threading
import time

import dns.message
import dns.rcode
import dns.rrset
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from depdrill.discover.capture import LiveCapture, _Priority
from depdrill.discover.dissect import Dissector, PacketEvent
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


def test_the_filter_keeps_accepted_syns_and_loopback_in_the_kernel(scratch_net: ScratchNet) -> None:
    # Given a service namespace, a peer, and a capture reading the service's ring
    svc, peer = scratch_net.add("svc", 10), scratch_net.add("peer", 20)
    client = (
        "import socket, sys\n"
        "for host, port in ((sys.argv[1], int(sys.argv[2])), ('127.0.0.1', 5999)):\n"
        "    s = socket.socket(); s.settimeout(0.5)\n"
        "    try: s.connect((host, port))\n"
        "    except OSError: pass\n"
        "    s.close()\n"
    )
    with LiveCapture.open(Target(netns=svc)) as capture:
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
    # Then only the service's own attempt to the peer reached the ring
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
    priority = _Priority()
    try:
        # When lowered, Then it is SCHED_IDLE; when restored, its own policy again
        priority.lower()
        assert os.sched_getscheduler(0) == os.SCHED_IDLE and priority.background
        priority.lower()  # idempotent
        priority.restore()
        assert os.sched_getscheduler(0) == os.SCHED_OTHER and not priority.background
    finally:
        priority.restore()
