"""What both kernel taps (ebpf and nflog) promise alike, in real namespaces: every packet
read or counted as dropped, times in the order things happened, a UDP flow kept once."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import pytest
from tap_traffic import udp_echo

from depdrill.discover.ebpf import EbpfCapture
from depdrill.discover.nflog import NflogCapture
from depdrill.discover.packets import decode_ip
from depdrill.netns import Target
from depdrill.testing import ScratchNet

SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b"%06d" % i + b"." * 594, (sys.argv[1], 53))
"""
ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
for i in range(5):
    s.sendto(b"ask%d" % i, (sys.argv[1], 53)); s.recvfrom(4096)
"""
FLOWS = """
import socket, sys
one = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(50):
    one.sendto(b"hits:1|c", (sys.argv[1], 8125))
    one.sendto(b"q%02d" % i, (sys.argv[1], 53))
for i in range(3):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.sendto(b"hits:1|c", (sys.argv[1], 8125))
"""
Capture = EbpfCapture | NflogCapture
# Each tap, opened with room for only a few dozen packets when `small`.
OPEN: dict[str, Callable[[Target, bool], Capture]] = {
    "ebpf": lambda t, small: (
        EbpfCapture.open(t, ring_bytes=1 << 16) if small else EbpfCapture.open(t)
    ),
    "nflog": lambda t, small: (
        NflogCapture.open(t, receive_buffer=1 << 16) if small else NflogCapture.open(t)
    ),
}
TAPS = pytest.mark.parametrize("tap", sorted(OPEN))


@TAPS
def test_every_packet_is_read_or_counted_as_dropped(scratch_net: ScratchNet, tap: str) -> None:
    # Given a capture that holds only a few dozen packets, and nobody reading it
    svc = scratch_net.add("svc", 10)
    scratch_net.add("peer", 20)
    sent = 3000
    with OPEN[tap](Target(netns=svc), True) as capture:
        # When the service sends far more DNS-port datagrams than that
        scratch_net.exec(svc, sys.executable, "-c", SENDER, scratch_net.address(20), str(sent))
        time.sleep(0.2)
        frames = list(capture.frames(0.3))
    ours = [
        seg
        for seg in (decode_ip(p) for _, p in frames)
        if seg is not None and seg.dport == 53 and len(seg.payload) == 600
    ]
    # Then the kernel dropped some, and every datagram was either read or counted as dropped
    assert capture.kernel_drops > 0 and ours
    assert len(ours) + capture.kernel_drops == sent
    # And what was read arrived whole and in order
    numbers = [int(seg.payload[:6]) for seg in ours]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


@TAPS
def test_answers_and_questions_keep_their_order_in_time(scratch_net: ScratchNet, tap: str) -> None:
    # Given a service, a UDP echo on port 53, and a capture reading in the background
    svc = scratch_net.add("svc", 10)
    with udp_echo(scratch_net, 20), OPEN[tap](Target(netns=svc), False) as capture:
        stop = threading.Event()
        frames: list[tuple[float, bytes]] = []
        reader = threading.Thread(
            target=lambda: frames.extend(capture.frames(30, stop, background=True))
        )
        reader.start()
        # When the service asks five times, each answer awaited before the next question
        before = time.time()
        scratch_net.exec(svc, sys.executable, "-c", ASK, scratch_net.address(20))
        after = time.time()
        stop.set()
        reader.join()
    asked = [
        (t, s.payload)
        for t, s in ((t, decode_ip(p)) for t, p in frames)
        if s is not None and s.payload.startswith(b"ask")
    ]
    # Then all ten were read, questions and answers
    assert [p for _, p in asked] == [p for i in range(5) for p in (b"ask%d" % i,) * 2]
    # And their wall-clock times are in the order they happened, within the exchange
    times = [t for t, _ in asked]
    assert times == sorted(times)
    assert before - 0.01 <= times[0] and times[-1] <= after + 0.01


@TAPS
def test_a_udp_flow_is_kept_once_and_every_dns_message_always(
    scratch_net: ScratchNet, tap: str
) -> None:
    # Given a capture of a service
    svc = scratch_net.add("svc", 10)
    scratch_net.add("peer", 20)
    with OPEN[tap](Target(netns=svc), False) as capture:
        # When it sends 50 datagrams on one flow and one on each of three more, and 50 DNS
        # messages from the same socket
        scratch_net.exec(svc, sys.executable, "-c", FLOWS, scratch_net.address(20))
        segments = [decode_ip(p) for _, p in capture.frames(0.3)]
    flows = [(s.sport, s.dport) for s in segments if s is not None and s.dport == 8125]
    dns = [s.payload for s in segments if s is not None and s.dport == 53]
    # Then each of the four flows was kept once (the graph counts flows, not datagrams)
    assert len(flows) == len(set(flows)) == 4
    # And every DNS message was, in order, with nothing dropped
    assert dns == [b"q%02d" % i for i in range(50)]
    assert capture.kernel_drops == 0
