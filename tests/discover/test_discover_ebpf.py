"""The eBPF capture in real namespaces: its programs' life, large and fragmented packets, a
device without an Ethernet header, the verifier's verdict on every variant, and the
assembler it is written with. What it shares with nflog: test_discover_taps.py."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from tap_traffic import udp_echo

from depdrill.bpf import (
    MAP_ARRAY,
    MAP_LRU_HASH,
    MAP_RINGBUF,
    R0,
    TCX_NEXT,
    Asm,
    BpfUnavailable,
    attached,
    create_map,
    load_program,
)
from depdrill.discover.ebpf import EbpfCapture, program
from depdrill.discover.fold import FoldMaps
from depdrill.discover.packets import decode_ip
from depdrill.discover.run import open_tap
from depdrill.netns import Target, entered
from depdrill.testing import RUN, ScratchNet, sh

HOLDER = """
import sys, time
from depdrill.discover.ebpf import EbpfCapture
from depdrill.netns import Target
capture = EbpfCapture.open(Target(netns=sys.argv[1]))
print("ready", flush=True)
time.sleep(60)
"""
TUNSETIFF = 0x400454CA
TUNSETLINK = 0x400454CD
ARPHRD_INFINIBAND = 32
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def _programs(target: Target) -> int:
    """tcx programs on eth0, both directions."""
    with entered(target):
        index = socket.if_nametoindex("eth0")
        return attached(index, True) + attached(index, False)


def test_the_programs_go_with_the_capture_and_with_its_killed_process(
    scratch_net: ScratchNet,
) -> None:
    # Given a service namespace
    target = Target(netns=scratch_net.add("svc", 10))
    # When a capture opens and closes
    with EbpfCapture.open(target) as capture:
        assert _programs(target) == 2 and capture.interfaces == ["eth0"]
    # Then nothing is attached any more
    assert _programs(target) == 0
    # And when the process holding a capture is killed outright
    with subprocess.Popen(
        [sys.executable, "-P", "-c", HOLDER, str(target.netns)], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
            assert _programs(target) == 2
        finally:
            holder.kill()
    # Then the kernel detaches its programs with the links it held
    deadline = time.monotonic() + 5
    while _programs(target) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _programs(target) == 0


def test_a_large_answer_is_kept_whole_and_later_fragments_are_not(scratch_net: ScratchNet) -> None:
    # Given a service and a UDP echo on port 53 behind a 1500-byte MTU
    svc = scratch_net.add("svc", 10)
    ask = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        "s.sendto(b'A' * 1400, (sys.argv[1], 53)); s.recvfrom(4096)\n"
        "s.sendto(b'B' * 3000, (sys.argv[1], 53)); s.recvfrom(4096)\n"
    )
    with udp_echo(scratch_net, 20), EbpfCapture.open(Target(netns=svc)) as capture:
        # When it sends a 1400-byte question (one frame) and a 3000-byte one (fragmented
        # on the wire), and both come back
        scratch_net.exec(svc, sys.executable, "-c", ask, scratch_net.address(20))
        frames = [p for _, p in capture.frames(0.2)]
    segments = [decode_ip(p) for p in frames]
    # Then the unfragmented ones were kept whole, both ways (the 2048-byte records)
    assert [s.payload for s in segments if s is not None and s.payload[:1] == b"A"] == [
        b"A" * 1400
    ] * 2
    # And of the fragmented ones only the first fragments, which carry the ports
    firsts = [s for s in segments if s is not None and s.payload[:1] == b"B"]
    assert len(firsts) == 2 and all(1400 < len(s.payload) < 1500 for s in firsts)
    assert len(frames) == 4 and capture.kernel_drops == 0


@contextmanager
def _tun(net: ScratchNet, target: Target, name: str, address: str) -> Iterator[int]:
    """A tun device (no link-layer header) up in the namespace at `address`/30; its fd."""
    with entered(target):
        tun = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        net.exec(str(target.netns), "ip", "addr", "add", f"{address}/30", "dev", name)
        net.exec(str(target.netns), "ip", "link", "set", name, "up")
        yield tun
    finally:
        os.close(tun)


def test_a_device_without_an_ethernet_header_is_read_at_its_ip_header(
    scratch_net: ScratchNet,
) -> None:
    # Given a service whose namespace has a tun device (as WireGuard or a VPN client has)
    svc = scratch_net.add("svc", 10)
    target = Target(netns=svc)
    with (
        _tun(scratch_net, target, "ddtun0", "198.18.251.1") as tun,
        EbpfCapture.open(target) as capture,
    ):
        assert capture.interfaces == ["ddtun0", "eth0"]
        # When a DNS question leaves through the tun device, and one arrives from it
        with entered(target), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"out", ("198.18.251.2", 53))
        os.write(tun, _udp_packet("198.18.251.2", "198.18.251.1", 53, 40000, b"in"))
        segments = [decode_ip(p) for _, p in capture.frames(0.2)]
    # Then both were read from their IP header on
    payloads = sorted(s.payload for s in segments if s is not None and 53 in (s.sport, s.dport))
    assert payloads == [b"in", b"out"]


def test_a_device_that_appears_during_the_capture_is_tapped_as_it_comes(
    scratch_net: ScratchNet,
) -> None:
    # Given a capture of a service reading in the background
    svc = scratch_net.add("svc", 10)
    target = Target(netns=svc)
    with EbpfCapture.open(target) as capture:
        stop = threading.Event()
        frames: list[tuple[float, bytes]] = []
        reader = threading.Thread(target=lambda: frames.extend(capture.frames(30, stop)))
        reader.start()
        try:
            # When a tun device comes up in its namespace (a VPN starting), and a DNS
            # question leaves through it once the reader has had a look
            with _tun(scratch_net, target, "ddtun1", "198.18.251.5"):
                deadline = time.monotonic() + 5
                while "ddtun1" not in capture.interfaces and time.monotonic() < deadline:
                    time.sleep(0.02)
                with entered(target), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    index = socket.if_nametoindex("ddtun1")
                    tapped = attached(index, True) + attached(index, False)
                    sock.sendto(b"late", ("198.18.251.6", 53))
                time.sleep(0.2)
        finally:
            stop.set()
            reader.join()
    # Then the device was tapped both ways, and the question was read
    assert tapped == 2 and capture.interfaces == ["ddtun1", "eth0"]
    assert "tcx ingress and egress on ddtun1, eth0" in capture.filter
    assert [s.payload for s in (decode_ip(p) for _, p in frames) if s is not None] == [b"late"]


def _udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 UDP datagram, checksummed (UDP's checksum left out, as IPv4 allows)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    words = sum(struct.unpack("!10H", header))
    while words > 0xFFFF:
        words = (words & 0xFFFF) + (words >> 16)
    return header[:10] + struct.pack("!H", ~words & 0xFFFF) + header[12:] + udp


def test_both_programs_pass_the_verifier_for_every_kind_of_device(scratch_net: ScratchNet) -> None:
    # Given the capture's maps in a real namespace
    maps = [
        create_map(MAP_RINGBUF, 0, 0, 1 << 16, "t_ring"),
        create_map(MAP_LRU_HASH, 40, 8, 16, "t_flows"),
        create_map(MAP_ARRAY, 4, 8, 1, "t_drops"),
    ]
    try:
        folds = FoldMaps.create(maps)
        # When each direction is built for an Ethernet header and for none, folding or not
        for ingress in (True, False):
            for header in (14, 0):
                for fold in (None, folds):
                    code = program(*maps[:3], ingress, header, (1024, 65535), fold).assemble()
                    # Then the kernel's verifier accepts it
                    os.close(load_program(code, "t_program"))
    finally:
        for fd in maps:
            os.close(fd)


def test_the_assembler_resolves_labels_and_refuses_a_missing_one() -> None:
    # Given a program that jumps over one instruction
    a = Asm()
    a.jump("end", R0, "==", 0)
    a.alu(R0, "=", 1)
    a.label("end")
    a.alu(R0, "=", TCX_NEXT)
    a.exit()
    # When assembled, then the jump's offset counts from the instruction after it
    code = a.assemble()
    assert len(code) == 4 * 8 and struct.unpack_from("<h", code, 2)[0] == 1
    # And a jump to a label never placed is refused, as is a label placed twice
    b = Asm()
    b.jump("nowhere")
    with pytest.raises(ValueError, match="nowhere"):
        b.assemble()
    b.label("x")
    with pytest.raises(ValueError, match="placed twice"):
        b.label("x")


def test_a_refused_program_says_what_the_verifier_said() -> None:
    # Given a program that returns without setting its verdict
    a = Asm()
    a.exit()
    # When it is loaded, then the kernel's refusal comes with the verifier's words
    with pytest.raises(BpfUnavailable, match=r"refused the BPF program: .*verifier: .*R0"):
        load_program(a.assemble(), "t_refused")


def test_a_device_it_cannot_read_sends_auto_to_nflog_with_the_reason(
    scratch_net: ScratchNet,
) -> None:
    # Given a namespace with a device of a link type the programs cannot parse (a tun
    # device re-typed to InfiniBand, as TUNSETLINK allows)
    svc = scratch_net.add("svc", 10)
    target = Target(netns=svc)
    with entered(target):
        tun = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", b"ddib0", IFF_TUN | IFF_NO_PI))
        fcntl.ioctl(tun, TUNSETLINK, ARPHRD_INFINIBAND)
        # When discovery asks for the eBPF tap, it is refused in one line
        with pytest.raises(BpfUnavailable, match="device ddib0 has link type 32"):
            EbpfCapture.open(target)
        # And "auto" captures through nflog, and says why not eBPF
        capture, why = open_tap(target, "auto")
        with contextlib.closing(capture):
            assert capture.tap == "nflog" and why.startswith("ebpf: device ddib0 has link type")
        # And nothing of the refused capture stays attached
        assert _programs(target) == 0
    finally:
        os.close(tun)


def test_a_namespace_with_loopback_alone_is_captured_on_no_device_and_says_so() -> None:
    # Given a namespace with nothing but loopback
    name = f"ddt{RUN}lo"
    sh("ip", "netns", "add", name)
    try:
        # When the eBPF tap opens there
        with EbpfCapture.open(Target(netns=name)) as capture:
            # Then it taps nothing, and its description says so
            assert capture.interfaces == []
            assert capture.filter.startswith("tcx ingress and egress on no device: DNS")
    finally:
        sh("ip", "netns", "del", name, check=False)
