"""Packets in through eBPF: a tcx program on each of the namespace's devices keeps what
discovery reads and writes it to a ring buffer.

The cheapest of the three taps for the service. The packet socket makes every packet of a
hooked device pay a call into it (and on transmit a clone of the skb); nflog makes every
packet meet nft's rules and each packet it logs pay nfnetlink_log's message building
(bench/tapcost.py). Here a short JITed program reads the headers and returns; a packet it
keeps is copied once, into a ring this process maps, with no wakeup (the reader polls on
its own clock). Per packet here: 90-120 ns for one it does not keep (30-65 of them the
tcx hook itself), 150-220 ns for one it keeps, against 0.9 us through nflog and 0.45 us
through the packet socket. What it keeps is nflog's choice (discover/nflog.py): DNS both ways on
port 53, the UDP the service sends (once per flow every UDP_EVERY_S, its first
UDP_SNAPLEN bytes), its connection attempts (SYN without ACK) and its TLS ClientHellos
(from the ephemeral port range).

What it sees, next to the others: every device of the namespace, including those that
appear while it captures (loopback never, as with the other taps), forwarded packets too
(as the packet socket), fragments as they are on the wire (a first IPv4 fragment is judged
by its ports, a later one has none and is never kept, which the dissector could not read
either; IPv6 fragments are all kept, for the dissector to judge), IPv6 only without
extension headers before TCP or UDP (a fragment header aside). Devices with an Ethernet
header or none (tunnels) are read; any other kind of device makes the tap refuse at open,
and `auto` uses nflog instead (one that appears later is named in `filter`, untapped).
Drops are exact: the program counts every packet it could not reserve ring space for.
Opened with `fold` (as discovery opens it), a UDP question the service sends and its
answer are paired in the kernel, and an exchange that repeats one already copied is only
counted (discover/fold.py).

Safety: the program is attached through tcx links (Linux 6.6), which live as long as
their descriptors: the capture's end, or its process's death (SIGKILL included), detaches
them. `TCX_NEXT` is the only verdict: the program never changes what happens to a packet,
and other tc programs on the device run as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

from depdrill.bpf import (
    BUSY,
    DISCARDED,
    FP,
    HELPER_KTIME_NS,
    HELPER_MAP_LOOKUP,
    HELPER_MAP_UPDATE,
    HELPER_RINGBUF_DISCARD,
    HELPER_RINGBUF_RESERVE,
    HELPER_RINGBUF_SUBMIT,
    HELPER_SKB_LOAD_BYTES,
    LENGTH,
    MAP_ARRAY,
    MAP_LRU_HASH,
    MAP_RINGBUF,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R8,
    R9,
    RB_NO_WAKEUP,
    TCX_NEXT,
    Asm,
    BpfUnavailable,
    Ring,
    attach_tcx,
    create_map,
    load_program,
    lookup,
    run_time,
)
from depdrill.discover import fold
from depdrill.discover.capture import ClosesOnExit, Priority, namespace_addresses
from depdrill.discover.fold import HELD_MARK, FoldMaps, Folds, Repeat, held_packet
from depdrill.discover.nflog import UDP_EVERY_S, UDP_FLOWS, UDP_SNAPLEN, ephemeral_ports
from depdrill.netlink import NLMSG, find_attr
from depdrill.netns import Target, entered

RING_BYTES: Final = 32 << 20  # as the packet socket's buffer: seconds of heavy DNS
UDP_FLOW_ENTRIES: Final = 2 * UDP_FLOWS  # one map for both families
# Records are reserved in a few sizes (the kernel wants a constant size per reservation),
# so the ring holds as many packets as it can: a DNS question fits the first, most
# answers the second, a full-size frame the fourth, a GSO segment the last.
TIERS: Final = (128, 256, 512, 2048, 65536)
RECORD: Final = struct.Struct("=QII")  # monotonic ns, bytes copied, the packet's length
READ_CHUNK: Final = 1 << 20  # ring bytes turned into packets at a time (memory stays flat)
READ_PAUSE_S: Final = 0.05  # records gather this long between reads (nflog's flush time)
BATCH_PAUSE_S: Final = 0.3  # in the background under light load (nflog's BATCH_PAUSE_S)
# Under 1/LIGHT_SHARE of the ring read in a round, the load is light; past 1/BUSY_SHARE
# the loop takes its normal priority again (the ring fills faster than an idle CPU drains).
LIGHT_SHARE: Final = 64
BUSY_SHARE: Final = 4

# Link-layer header length by device type (ARPHRD_*, linux/if_arp.h). Ethernet (veth,
# bridges, VLAN devices, macvlan, physical NICs) and the header-less: tun, WireGuard,
# IP-in-IP, GRE, SIT, raw IP (cellular).
LINK_HEADERS: Final = {1: 14, 65534: 0, 768: 0, 769: 0, 776: 0, 778: 0, 823: 0, 519: 0}
ARPHRD_LOOPBACK: Final = 772
SIOCGIFHWADDR: Final = 0x8927
NETLINK_ROUTE: Final = 0
RTMGRP_LINK: Final = 1
RTM_NEWLINK: Final = 16
IFLA_IFNAME: Final = 3
IFINFO: Final = struct.Struct("=BxHiII")  # family, device type, index, flags, change

ETH_P_IP: Final = socket.htons(0x0800)  # skb->protocol as stored: network byte order
ETH_P_IPV6: Final = socket.htons(0x86DD)
DNS_PORT: Final = socket.htons(53)
LATER_FRAGMENT: Final = socket.htons(0x1FFF)  # a fragment offset: not the first
IPPROTO_TCP, IPPROTO_UDP, IPV6_FRAGMENT = 6, 17, 44
SKB_LEN, SKB_PROTOCOL, SKB_DATA, SKB_DATA_END = 0, 16, 76, 80  # struct __sk_buff offsets

# The program's stack (offsets from the frame pointer; the verifier wants them aligned).
HDR, L4, PAY, KEY, VAL, ZERO = -48, -64, -72, -112, -120, -128
FLOW_KEY: Final = 40  # source, destination (16 bytes each), ports, IP version, padding


def program(
    ring: int,
    flows: int,
    drops: int,
    ingress: bool,
    link_header: int,
    ports: tuple[int, int],
    folds: FoldMaps | None = None,
) -> Asm:
    """The tcx program for one direction of one kind of device; with `folds`, questions to
    port 53 and their answers over UDP go through discover/fold.py first.

    r6: the skb. r7: the transport header's offset. r8: the IP header (in the packet, or
    copied to the stack), then a record. r9: the transport header, then bytes to copy.
    Every path ends at `next` (TCX_NEXT).
    """
    a = Asm()
    l3 = link_header

    def header(
        pointer: int,
        offset_reg: int | None,
        offset: int,
        into: int,
        length: int,
        short: str = "next",
    ) -> None:
        """`pointer` = the `length` bytes at skb offset (offset_reg +) offset: in place when
        the skb's linear part holds them (no helper call: the path every packet takes),
        else copied to the stack at fp + into. Fails to `short` when the packet is shorter."""
        copy, done = f"copy{len(a)}", f"read{len(a)}"
        a.load(R2, R6, SKB_DATA, 4)
        a.load(R3, R6, SKB_DATA_END, 4)
        a.alu(pointer, "=", R2, reg=True)
        if offset_reg is not None:
            a.alu(pointer, "+=", offset_reg, reg=True)
        if offset:
            a.alu(pointer, "+=", offset)
        a.alu(R4, "=", pointer, reg=True)
        a.alu(R4, "+=", length)
        a.jump(copy, R4, ">", R3, reg=True)
        a.jump(done)
        a.label(copy)
        load_bytes(offset_reg, offset, into, length)
        a.jump(short, R0, "!=", 0)
        a.alu(pointer, "=", FP, reg=True)
        a.alu(pointer, "+=", into)
        a.label(done)

    def load_bytes(offset_reg: int | None, offset: int, into: int, length: int) -> None:
        """bpf_skb_load_bytes(skb, offset, fp + into, length); r0 is 0 when it worked."""
        a.alu(R1, "=", R6, reg=True)
        if offset_reg is None:
            a.alu(R2, "=", offset)
        else:
            a.alu(R2, "=", offset_reg, reg=True)
            if offset:
                a.alu(R2, "+=", offset)
        a.alu(R3, "=", FP, reg=True)
        a.alu(R3, "+=", into)
        a.alu(R4, "=", length)
        a.call(HELPER_SKB_LOAD_BYTES)

    def ports_of(length: int, fold: str | None = None) -> None:
        """r9 = the transport header's first `length` bytes; DNS (port 53 either way) kept,
        or with `fold`, a question sent (an answer received) goes to that label."""
        header(R9, R7, 0, L4, length)
        if fold is not None:
            a.load(R0, R9, 0 if ingress else 2, 2)
            a.jump(fold, R0, "==", DNS_PORT)
        for offset in (0, 2):
            a.load(R0, R9, offset, 2)
            a.jump("keep", R0, "==", DNS_PORT)

    def transport(version: int) -> None:
        """UDP and TCP behind an IP header of this version (r0: the IP protocol). One copy
        per version: the verifier then knows how many bytes of the IP header r8 holds."""
        v = str(version)
        a.label("transport" + v)
        a.jump("udp" + v, R0, "==", IPPROTO_UDP)
        a.jump("tcp" + v, R0, "==", IPPROTO_TCP)
        a.jump("next")

        a.label("udp" + v)
        ports_of(8, None if folds is None else "fold" + v)
        if ingress:
            a.jump("next")
        else:
            # A flow (addresses, ports) logged less than UDP_EVERY_S ago is not logged again.
            for offset in range(0, FLOW_KEY, 8):
                a.store_imm(FP, KEY + offset, 8, 0)
            a.load(R0, R9, 0, 4)
            a.store(FP, KEY + 32, 4, R0)
            a.store_imm(FP, KEY + 36, 1, version)
            if version == 4:
                for offset in (0, 4):
                    a.load(R0, R8, 12 + offset, 4)
                    a.store(FP, KEY + 16 * offset // 4, 4, R0)
            else:
                for offset in (0, 8, 16, 24):
                    a.load(R0, R8, 8 + offset, 8)
                    a.store(FP, KEY + offset, 8, R0)
            a.jump("flow")

        a.label("tcp" + v)
        ports_of(14)  # through the flags
        if ingress:
            a.jump("next")
            return
        a.load(R0, R9, 13, 1)
        a.alu(R0, "&=", 0x12)
        a.jump("keep", R0, "==", 0x02)  # SYN without ACK: a connection attempt
        a.jump("client_hello")

    def flow_and_hello() -> None:
        """The egress tails the two versions share (r8 and r9 no longer needed as such)."""
        a.label("flow")
        a.call(HELPER_KTIME_NS)
        a.alu(R9, "=", R0, reg=True)
        a.load_map(R1, flows)
        a.alu(R2, "=", FP, reg=True)
        a.alu(R2, "+=", KEY)
        a.call(HELPER_MAP_LOOKUP)
        a.jump("remember", R0, "==", 0)
        a.load(R1, R0, 0, 8)
        a.alu(R2, "=", R9, reg=True)
        a.alu(R2, "-=", R1, reg=True)
        a.load_imm64(R3, UDP_EVERY_S * 1_000_000_000)
        a.jump("next", R2, "<", R3, reg=True)
        a.label("remember")
        a.store(FP, VAL, 8, R9)
        a.load_map(R1, flows)
        a.alu(R2, "=", FP, reg=True)
        a.alu(R2, "+=", KEY)
        a.alu(R3, "=", FP, reg=True)
        a.alu(R3, "+=", VAL)
        a.alu(R4, "=", 0)
        a.call(HELPER_MAP_UPDATE)
        a.alu(R9, "=", UDP_SNAPLEN)
        a.jump("snap")

        # A ClientHello: handshake record (0x16) whose first message is type 1, sent from
        # a port connect() picks (a server's segments skip the payload read), in a segment
        # with data (the payload is seldom in the linear part: it is copied).
        a.label("client_hello")
        a.load(R0, R9, 0, 2)
        a.swap16(R0)
        a.jump("next", R0, "<", ports[0])
        a.jump("next", R0, ">", ports[1])
        a.load(R0, R9, 12, 1)
        a.alu(R0, ">>=", 4)
        a.alu(R0, "<<=", 2)
        a.alu(R7, "+=", R0, reg=True)  # the payload's offset
        a.load(R2, R6, SKB_LEN, 4)
        a.alu(R2, "-=", R7, reg=True)
        a.jump("next", R2, "s<", 6)  # no payload, or too little to be a ClientHello
        load_bytes(R7, 0, PAY, 6)
        a.jump("next", R0, "!=", 0)
        a.load(R0, FP, PAY, 1)
        a.jump("next", R0, "!=", 0x16)
        a.load(R0, FP, PAY + 5, 1)
        a.jump("next", R0, "!=", 0x01)
        a.jump("keep")

    a.alu(R6, "=", R1, reg=True)
    a.load(R0, R6, SKB_PROTOCOL, 4)
    a.jump("v4", R0, "==", ETH_P_IP)
    a.jump("v6", R0, "==", ETH_P_IPV6)
    a.jump("next")

    a.label("v4")
    header(R8, None, l3, HDR, 20)
    a.load(R7, R8, 0, 1)
    a.alu(R7, "&=", 0x0F)
    a.alu(R7, "<<=", 2)
    a.jump("next", R7, "<", 20)
    a.alu(R7, "+=", l3)
    a.load(R0, R8, 6, 2)
    a.jump("next", R0, "&", LATER_FRAGMENT)  # no ports to judge by (nor to dissect)
    a.load(R0, R8, 9, 1)
    a.jump("transport4")

    a.label("v6")
    header(R8, None, l3, HDR, 40)
    a.alu(R7, "=", l3 + 40)
    a.load(R0, R8, 6, 1)
    a.jump("keep", R0, "==", IPV6_FRAGMENT)
    a.jump("transport6")

    for version in (4, 6):
        transport(version)
        if folds is not None:
            fold.emit(a, folds, ring, drops, version, ingress, header)
    if not ingress:
        flow_and_hello()

    # What is kept: the packet from its IP header, whole, or (`snap`) its first r9 bytes.
    if not ingress:  # the verifier refuses code no path reaches
        a.label("snap")
        a.load(R1, R6, SKB_LEN, 4)
        a.alu(R1, "-=", l3)
        a.jump("copy", R9, "<=", R1, reg=True)
        a.alu(R9, "=", R1, reg=True)
        a.jump("copy")
    a.label("keep")
    a.load(R9, R6, SKB_LEN, 4)
    a.alu(R9, "-=", l3)
    a.label("copy")
    a.jump("next", R9, "<", 1)
    a.jump("bounded", R9, "<=", TIERS[-1] - RECORD.size)
    a.alu(R9, "=", TIERS[-1] - RECORD.size)
    a.label("bounded")
    a.call(HELPER_KTIME_NS)
    a.alu(R7, "=", R0, reg=True)
    for index, tier in enumerate(TIERS):
        a.label(f"tier{index}")
        if index + 1 < len(TIERS):
            a.jump(f"tier{index + 1}", R9, ">", tier - RECORD.size)
        a.load_map(R1, ring)
        a.alu(R2, "=", tier)
        a.alu(R3, "=", 0)
        a.call(HELPER_RINGBUF_RESERVE)
        a.jump("lost", R0, "==", 0)
        a.alu(R8, "=", R0, reg=True)
        a.store(R8, 0, 8, R7)
        a.store(R8, 8, 4, R9)
        a.load(R1, R6, SKB_LEN, 4)
        a.alu(R1, "-=", l3)
        a.store(R8, 12, 4, R1)
        a.alu(R1, "=", R6, reg=True)
        a.alu(R2, "=", l3)
        a.alu(R3, "=", R8, reg=True)
        a.alu(R3, "+=", RECORD.size)
        a.alu(R4, "=", R9, reg=True)
        a.call(HELPER_SKB_LOAD_BYTES)
        a.alu(R1, "=", R8, reg=True)
        a.alu(R2, "=", RB_NO_WAKEUP)
        a.jump(f"discard{index}", R0, "!=", 0)
        a.call(HELPER_RINGBUF_SUBMIT)
        a.jump("next")
        a.label(f"discard{index}")
        a.call(HELPER_RINGBUF_DISCARD)
        a.jump("next")

    a.label("lost")  # no room in the ring: counted, so the graph can say so
    a.store_imm(FP, ZERO, 4, 0)
    a.load_map(R1, drops)
    a.alu(R2, "=", FP, reg=True)
    a.alu(R2, "+=", ZERO)
    a.call(HELPER_MAP_LOOKUP)
    a.jump("next", R0, "==", 0)
    a.alu(R1, "=", 1)
    a.atomic_add(R0, 0, R1)

    a.label("next")
    a.alu(R0, "=", TCX_NEXT)
    a.exit()
    return a


def describe(
    interfaces: list[str], ports: tuple[int, int], untapped: list[str], folding: bool = False
) -> str:
    """What the programs keep and where, in words (the graph's record of how it captured)."""
    missed = f"; not tapped: {', '.join(untapped)}" if untapped else ""
    folded = (
        "; a UDP question and its answer that repeat an exchange seen in full (byte for "
        "byte, the ID aside) are counted in the kernel, not copied"
        if folding
        else ""
    )
    return (
        f"tcx ingress and egress on {', '.join(interfaces) or 'no device'}: "
        "DNS on port 53 (UDP and TCP, both ways), IPv6 fragments, and from the service: "
        f"UDP (a flow every {UDP_EVERY_S} s, {UDP_SNAPLEN} bytes), SYN without ACK, "
        f"ClientHello from ports {ports[0]}-{ports[1]}{folded}{missed}"
    )


def link_type(name: str) -> int:
    """The device's ARPHRD_* type, in this thread's namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16s16x", name.encode()[:15])
        reply = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, request)
    return int(struct.unpack_from("H", reply, 16)[0])


def _device_announcements() -> socket.socket:
    """An rtnetlink socket in this thread's namespace, told of every new device."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.bind((0, RTMGRP_LINK))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _new_devices(sock: socket.socket) -> tuple[list[tuple[int, str, int]], bool]:
    """(index, name, ARPHRD type) of each device announced on `sock` since the last read;
    and whether announcements were lost (the socket overflowed: list the devices again)."""
    found: list[tuple[int, str, int]] = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return found, False
        except OSError:  # ENOBUFS
            return found, True
        offset = 0
        while offset + NLMSG.size + IFINFO.size <= len(data):
            length, kind, *_ = NLMSG.unpack_from(data, offset)
            if length < NLMSG.size:
                break
            if kind == RTM_NEWLINK:
                _, link, index, _, _ = IFINFO.unpack_from(data, offset + NLMSG.size)
                start = offset + NLMSG.size + IFINFO.size
                name = find_attr(data, start, offset + length, IFLA_IFNAME)
                if name is not None:
                    found.append((index, name.split(b"\0", 1)[0].decode(errors="replace"), link))
            offset += (length + 3) & ~3


def _listed_devices() -> list[tuple[int, str, int]]:
    """(index, name, ARPHRD type) of each device in this thread's namespace."""
    found = []
    for index, name in socket.if_nameindex():
        with contextlib.suppress(OSError):
            found.append((index, name, link_type(name)))
    return found


class PacketRing(Ring):
    """The capture's ring, whose records are RECORD then the packet."""

    def packets(self, limit: int) -> list[tuple[float, bytes]]:
        """(time, IP packet) for the records in the first `limit` bytes of the ring.

        Each record is cut once, straight from the mapping, in one loop with its lookups
        bound locally: this runs for every packet (0.6 us a packet here; 1.2 through a
        generic read that copied each record out first).
        """
        position, end = self.span(limit)
        length_of, record = LENGTH.unpack_from, RECORD.unpack_from
        ring, mask, data, start = self._producer, self._mask, self._data, 8 + RECORD.size
        # bpf_ktime_get_ns is CLOCK_MONOTONIC; the graph wants wall-clock times (taken now,
        # so a clock stepped during the capture is followed from the next read on).
        epoch = time.time() - time.monotonic()
        out: list[tuple[float, bytes]] = []
        append = out.append
        while position < end:
            at = data + (position & mask)
            (length,) = length_of(ring, at)
            if length & BUSY:
                break  # reserved, not yet submitted: the next read takes it
            if not length & DISCARDED:
                stamp, copied, size = record(ring, at + 8)
                if size == HELD_MARK:  # a question the kernel held (discover/fold.py)
                    append(held_packet(ring, at + start, epoch))
                else:
                    append((stamp * 1e-9 + epoch, ring[at + start : at + start + copied]))
            position += (length & ~DISCARDED) + 15 & ~7  # the header, padded to 8 bytes
        self.release(position)
        return out


class EbpfCapture(ClosesOnExit):
    """tcx programs on every device of the target's namespace, feeding one ring buffer.

    A device that appears while it captures (a VPN coming up, a veth a CNI adds) is tapped
    as it comes: an rtnetlink socket in the namespace, subscribed before the devices are
    listed, announces it, and the reading loop attaches to it.
    """

    tap: Final = "ebpf"

    def __init__(self, target: Target, addresses: list[str], ports: tuple[int, int]) -> None:
        self.interfaces: list[str] = []
        self.service_addresses = addresses
        self.filter = ""
        self.kernel_drops = 0
        self.packet_count = 0
        self.untapped: list[str] = []  # devices that came later, of a kind it does not read
        self._target = target
        self._ports = ports
        self._maps: tuple[int, int, int] = (-1, -1, -1)  # ring, UDP flows, drops
        self._fds: list[int] = []  # maps and programs: closed with the capture
        self._programs: dict[tuple[bool, int], int] = {}  # (ingress, link header) -> fd
        self._links: list[int] = []  # closing these detaches the programs
        self._detached = False
        self._tapped: set[int] = set()  # ifindexes
        self._ring: PacketRing | None = None
        self._devices: socket.socket | None = None  # rtnetlink: devices as they come
        self._lock = threading.Lock()
        self._folds: Folds | None = None
        # With folding, where the folds' counts go (set before `frames`).
        self.on_repeat: Callable[[Repeat], None] | None = None

    @property
    def folded(self) -> int:
        """DNS exchanges counted in the kernel (discover/fold.py) and handed on so far."""
        return 0 if self._folds is None else self._folds.folded

    @classmethod
    def open(
        cls,
        target: Target,
        ring_bytes: int = RING_BYTES,
        fold: bool = False,
    ) -> EbpfCapture:
        """The capture, keeping packets from the moment this returns.

        `ring_bytes`: what the ring holds for a reader that falls behind (a power of two,
        in pages); past it the program counts what it could not keep. `fold`: repeated DNS
        exchanges are counted in the kernel (discover/fold.py) and handed to `on_repeat`
        as they are read, instead of coming through `frames` packet by packet.
        """
        with entered(target):
            capture = cls(target, namespace_addresses(), ephemeral_ports())
            try:
                with contextlib.suppress(OSError):  # without it, devices present now only
                    capture._devices = _device_announcements()
                devices: dict[int, tuple[str, int]] = {}
                for index, name in socket.if_nameindex():
                    try:
                        kind = link_type(name)
                    except OSError as exc:
                        raise BpfUnavailable(f"cannot read device {name}: {exc.strerror}") from None
                    if kind not in LINK_HEADERS and kind != ARPHRD_LOOPBACK:
                        raise BpfUnavailable(
                            f"device {name} has link type {kind}, which the eBPF tap does not read"
                        )
                    devices[index] = (name, kind)
                capture._make_maps(ring_bytes, fold)
                for index, (name, kind) in sorted(devices.items()):
                    capture._tap(index, name, kind)
                capture.filter = capture._describe()
            except BaseException:
                capture.close()
                raise
        return capture

    def _make_maps(self, ring_bytes: int, fold: bool) -> None:
        ring = create_map(MAP_RINGBUF, 0, 0, ring_bytes, "depdrill_ring")
        self._fds.append(ring)
        flows = create_map(MAP_LRU_HASH, FLOW_KEY, 8, UDP_FLOW_ENTRIES, "depdrill_flows")
        self._fds.append(flows)
        drops = create_map(MAP_ARRAY, 4, 8, 1, "depdrill_drops")
        self._fds.append(drops)
        self._maps = (ring, flows, drops)
        if fold:
            self._folds = Folds(FoldMaps.create(self._fds))
        try:
            self._ring = PacketRing(ring, ring_bytes)
        except OSError as exc:
            raise BpfUnavailable(f"cannot map the BPF ring: {exc.strerror}") from None

    def _tap(self, ifindex: int, name: str, kind: int) -> None:
        """Attach to one device, both ways (this thread in the target's namespace)."""
        if ifindex in self._tapped or kind == ARPHRD_LOOPBACK:
            return
        header = LINK_HEADERS.get(kind)
        if header is None:
            self.untapped.append(f"{name} (link type {kind})")
        else:
            for ingress in (True, False):
                key = (ingress, header)
                if key not in self._programs:
                    folds = None if self._folds is None else self._folds.maps
                    code = program(*self._maps, ingress, header, self._ports, folds)
                    fd = load_program(code.assemble(), "depdrill_in" if ingress else "depdrill_out")
                    self._fds.append(fd)
                    self._programs[key] = fd
                link = attach_tcx(self._programs[key], ifindex, ingress)
                with self._lock:
                    if self._detached:  # closed meanwhile: this one goes too
                        os.close(link)
                        return
                    self._links.append(link)
            self.interfaces = sorted({*self.interfaces, name})
        self._tapped.add(ifindex)

    def _follow_devices(self) -> None:
        """Tap the devices announced since the last look."""
        if self._devices is None:
            return
        announced, lost = _new_devices(self._devices)
        if not announced and not lost:
            return
        with entered(self._target):
            for index, name, kind in announced + (_listed_devices() if lost else []):
                try:
                    self._tap(index, name, kind)
                except BpfUnavailable as exc:  # gone again, or the kernel said no
                    self.untapped.append(f"{name} ({exc})")
                    self._tapped.add(index)
        self.filter = self._describe()

    def program_run_time(self) -> dict[str, tuple[int, int]]:
        """(ns, runs) of the ingress and of the egress programs, summed over kinds of device:
        counted while depdrill.bpf.run_statistics() is held open (bench/progcost.py)."""
        totals = {"ingress": (0, 0), "egress": (0, 0)}
        for (ingress, _), fd in self._programs.items():
            spent, runs = run_time(fd)
            way = "ingress" if ingress else "egress"
            totals[way] = (totals[way][0] + spent, totals[way][1] + runs)
        return totals

    def _describe(self) -> str:
        return describe(self.interfaces, self._ports, self.untapped, self._folds is not None)

    def frames(
        self, duration_s: float, stop: threading.Event | None = None, background: bool = False
    ) -> Iterator[tuple[float, bytes]]:
        """(time, IP packet) until `duration_s` passes or `stop` is set; then what is pending.

        `background`: as LiveCapture.frames (SCHED_IDLE while it keeps up, and under light
        load records gather for BATCH_PAUSE_S before they are read).
        """
        ring = self._ring
        if ring is None:
            return
        if self._folds is not None and self.on_repeat is None:
            raise ValueError("a folding capture needs on_repeat before its frames are read")
        priority = Priority() if background else None
        deadline = time.monotonic() + duration_s
        try:
            while not (stop is not None and stop.is_set()):
                now = time.monotonic()
                if now >= deadline:
                    break
                read = 0
                while pending := ring.pending():
                    read += min(pending, READ_CHUNK)
                    yield from self._read(ring, READ_CHUNK)
                    if read > ring.size // BUSY_SHARE and priority is not None:
                        priority.restore()  # the host is busy for long: keep up, not lose
                yield from self._fold_round(final=False)
                self._follow_devices()
                if priority is not None:
                    priority.lower()
                light = priority is not None and read < ring.size // LIGHT_SHARE
                pause = min(BATCH_PAUSE_S if light else READ_PAUSE_S, deadline - now)
                if stop is not None:
                    stop.wait(max(0.0, pause))
                else:
                    time.sleep(max(0.0, pause))
            if priority is not None:  # whoever stopped us waits for the drain
                priority.restore()
            self._detach()  # nothing more is written: what the ring holds is the rest
            while batch := self._read(ring, READ_CHUNK):
                yield from batch
            yield from self._fold_round(final=True)
            self._count_drops()
        finally:
            if priority is not None:
                priority.restore()

    def _read(self, ring: PacketRing, limit: int) -> list[tuple[float, bytes]]:
        batch = ring.packets(limit)
        self.packet_count += len(batch)
        return batch

    def _fold_round(self, final: bool) -> list[tuple[float, bytes]]:
        """The questions held too long (every one, when `final`), as packets; the folds'
        new counts go to `on_repeat`."""
        if self._folds is None or self.on_repeat is None:
            return []
        held, repeats = self._folds.collect(final)
        self.packet_count += len(held)
        for repeat in repeats:
            self.packet_count += 2 * repeat.times
            self.on_repeat(repeat)
        return held

    def _count_drops(self) -> None:
        drops = self._maps[2]
        value = lookup(drops, b"\0\0\0\0", 8) if drops >= 0 else None
        if value is not None:
            self.kernel_drops = struct.unpack("=Q", value[:8])[0]

    def _detach(self) -> None:
        with self._lock:
            links, self._links, self._detached = self._links, [], True
        for fd in links:
            os.close(fd)

    def close(self) -> None:
        self._detach()
        with self._lock:
            fds, self._fds = self._fds, []
            ring, self._ring = self._ring, None
        if ring is not None:
            with contextlib.suppress(BufferError):
                ring.close()
        if self._devices is not None:
            self._devices.close()
        for fd in fds:
            os.close(fd)
