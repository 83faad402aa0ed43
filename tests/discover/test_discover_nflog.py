"""The NFLOG capture in real namespaces: its table's life, exact drop counts, its times,
and the one case it must stay away from (a bound NFQUEUE)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

import pytest

from depdrill.discover.capture import LiveCapture
from depdrill.discover.nflog import NflogCapture, NflogUnavailable, queues_in_use
from depdrill.discover.packets import decode_ip
from depdrill.discover.run import open_tap
from depdrill.netns import Target, entered
from depdrill.testing import ScratchNet

SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b"%06d" % i + b"." * 594, (sys.argv[1], 53))
"""
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048); s.sendto(data, peer)
"""
ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
for i in range(5):
    s.sendto(b"ask%d" % i, (sys.argv[1], 53)); s.recvfrom(2048)
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
HOLDER = """
import sys, time
from depdrill.discover.nflog import NflogCapture
from depdrill.netns import Target
capture = NflogCapture.open(Target(netns=sys.argv[1]))
print("ready", flush=True)
time.sleep(60)
"""


def _tables(net: ScratchNet, ns: str) -> list[str]:
    return [
        line.split()[-1]
        for line in net.exec(ns, "nft", "list", "tables").stdout.splitlines()
        if "depdrill-capture-" in line
    ]


def _read_all(capture: NflogCapture, seconds: float) -> list[tuple[float, bytes]]:
    return list(capture.frames(seconds))


def test_the_table_goes_with_the_capture_and_with_its_killed_process(
    scratch_net: ScratchNet,
) -> None:
    # Given a service namespace
    svc = scratch_net.add("svc", 10)
    # When a capture opens and closes
    with NflogCapture.open(Target(netns=svc)) as capture:
        assert _tables(scratch_net, svc) == [capture.filter.split()[2]]
    # Then its table is gone
    assert _tables(scratch_net, svc) == []
    # And when the process holding a capture is killed outright
    with subprocess.Popen(
        [sys.executable, "-P", "-c", HOLDER, svc], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
            assert len(_tables(scratch_net, svc)) == 1
        finally:
            holder.kill()
    # Then the kernel removes the table with the socket that owned it
    deadline = time.monotonic() + 5
    while _tables(scratch_net, svc) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tables(scratch_net, svc) == []


def test_every_packet_is_read_or_counted_as_dropped(scratch_net: ScratchNet) -> None:
    # Given a capture whose socket holds only a few batches, and nobody reading it
    svc, peer = scratch_net.add("svc", 10), scratch_net.add("peer", 20)
    sent = 3000
    with NflogCapture.open(Target(netns=svc), receive_buffer=1 << 16) as capture:
        # When the service sends far more DNS-port datagrams than that buffer holds
        scratch_net.exec(svc, sys.executable, "-c", SENDER, scratch_net.address(20), str(sent))
        time.sleep(0.2)
        frames = _read_all(capture, 0.3)
    del peer
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


def _exchange(net: ScratchNet, svc: str) -> tuple[list[tuple[float, bytes]], float, float]:
    """What a background capture read while the service asked the echo five times."""
    with NflogCapture.open(Target(netns=svc)) as capture:
        stop = threading.Event()
        frames: list[tuple[float, bytes]] = []
        reader = threading.Thread(
            target=lambda: frames.extend(capture.frames(30, stop, background=True))
        )
        reader.start()
        before = time.time()
        # each answer awaited before the next question
        net.exec(svc, sys.executable, "-c", ASK, net.address(20))
        after = time.time()
        stop.set()
        reader.join()
    return frames, before, after


def test_answers_and_questions_keep_their_order_in_time(scratch_net: ScratchNet) -> None:
    # Given a service, a UDP echo on port 53, and a capture reading in the background
    svc, peer = scratch_net.add("svc", 10), scratch_net.add("peer", 20)
    with subprocess.Popen(
        ["ip", "netns", "exec", peer, sys.executable, "-c", ECHO, scratch_net.address(20)],
        stdout=subprocess.PIPE,
        text=True,
    ) as echo:
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
            frames, before, after = _exchange(scratch_net, svc)
        finally:
            echo.kill()
    segments = [(t, decode_ip(p)) for t, p in frames]
    asked = [(t, s.payload) for t, s in segments if s is not None and s.payload.startswith(b"ask")]
    # When the service asks five times, each answer awaited before the next question
    # Then all ten were read: questions sent (no kernel time) and answers received (stamped)
    assert [p for _, p in asked] == [p for i in range(5) for p in (b"ask%d" % i,) * 2]
    times = [t for t, _ in asked]
    # And their times are in the order they happened, within the exchange
    assert times == sorted(times)
    assert before - 0.01 <= times[0] and times[-1] <= after + 0.01


def test_a_udp_flow_is_logged_once_and_every_dns_message_always(scratch_net: ScratchNet) -> None:
    # Given a capture of a service
    svc, peer = scratch_net.add("svc", 10), scratch_net.add("peer", 20)
    del peer
    with NflogCapture.open(Target(netns=svc)) as capture:
        # When it sends 50 datagrams on one flow and one on each of three more, and 50 DNS
        # messages from the same socket
        scratch_net.exec(svc, sys.executable, "-c", FLOWS, scratch_net.address(20))
        segments = [decode_ip(p) for _, p in _read_all(capture, 0.3)]
    flows = [(s.sport, s.dport) for s in segments if s is not None and s.dport == 8125]
    dns = [s.payload for s in segments if s is not None and s.dport == 53]
    # Then each of the four flows was logged once (the graph counts flows, not datagrams)
    assert len(flows) == len(set(flows)) == 4
    # And every DNS message was, in order
    assert dns == [b"q%02d" % i for i in range(50)]
    assert capture.kernel_drops == 0


def test_a_bound_nfqueue_keeps_nflog_out_of_its_namespace(scratch_net: ScratchNet) -> None:
    # Given a namespace where a queue is bound (an IPS, or depdrill's own latency fault)
    from netfilterqueue import NetfilterQueue

    svc = scratch_net.add("svc", 10)
    target = Target(netns=svc)
    with entered(target):
        queue = NetfilterQueue()
        queue.bind(4242, lambda packet: packet.accept())
        assert queues_in_use() == [4242]
    try:
        # When discovery asks for the nflog capture, it is refused in one line
        with pytest.raises(NflogUnavailable, match="NFQUEUE queue 4242 is bound"):
            NflogCapture.open(target)
        # And "auto" captures through the packet socket, and says why
        capture, why = open_tap(target, "auto")
        with contextlib.closing(capture):
            assert isinstance(capture, LiveCapture) and "NFQUEUE queue 4242" in why
        # And the CLI gives the same reason as a one-line error
        done = subprocess.run(
            [sys.executable, "-P", "-m", "depdrill.cli", "discover", "--netns", svc,
             "--tap", "nflog", "--duration", "0.2", "-o", "/dev/null"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode != 0 and last.startswith("depdrill: error: NFQUEUE queue 4242")
        assert "Traceback" not in done.stderr
    finally:
        queue.unbind()
    assert _tables(scratch_net, svc) == []
