"""Packets in: live from the target namespace (AF_PACKET + kernel BPF), or from pcap/pcapng.

The packet-socket tap (`--tap packet`, and the fallback where nflog cannot be used; the
default tap is nflog.py's, which costs the service's other packets less).

The only module that touches scapy, and only lazily: libpcap (through scapy) compiles the
filter, scapy reads capture files. The live socket is a cooked (SOCK_DGRAM) packet socket
opened inside the target namespace, so every frame arrives as an IP packet whatever the
interface type, and it stays bound to that namespace after this thread leaves it; where
the namespace has one interface (a container, a pod) it hooks that device only. Packets
are read from a TPACKET_V3 ring (one wake-up per block of packets, or per few blocks under
light load in the background), or one `recv` at a time where the kernel has no ring.

Staying out of the service's way: every packet the service sends or receives on a hooked
device costs it a call into the tap (bench/tapcost.py: some 250 ns here, most of it the
hook itself, the rest the filter and on transmit the skb's clone), so loopback is not
hooked where it can be avoided; the kernel filter passes only what discovery reads (DNS,
and connection attempts and ClientHellos *from* the service, not the ones it accepts),
never loopback, and refuses the rest in as few instructions as it can; and the packet loop
can run at SCHED_IDLE (`frames(background=True)`) so it takes CPU the service leaves idle;
the ring absorbs what arrives meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import mmap
import os
import resource
import select
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from depdrill.discover.packets import Segment, decode_frame, decode_ip
from depdrill.errors import CapabilityError, InputError
from depdrill.netns import Target, entered

ETH_P_ALL: Final = 0x0003
SOL_PACKET: Final = 263
PACKET_STATISTICS: Final = 6
SO_ATTACH_FILTER: Final = 26
SO_RCVBUFFORCE: Final = 33
ARPHRD_LOOPBACK: Final = 772
DLT_RAW: Final = 12
RECEIVE_BUFFER: Final = 32 << 20  # bursts of DNS must not overflow the socket (64 KiB default)
POLL_S: Final = 0.1  # how often a blocked capture looks at its stop event
BATCH: Final = 512
MAX_DRAIN: Final = 1 << 20  # packets read after the end, at most (a socket cannot hold more)
MAX_FILTER_ADDRESSES: Final = 64
PACKET_RX_RING: Final = 5
PACKET_VERSION: Final = 10
TPACKET_V3: Final = 2
TP_STATUS_USER: Final = 1
RING_BLOCK: Final = 1 << 20
RING_BLOCKS: Final = 32  # 32 MiB of ring: bursts of DNS wait here, not in the kernel's drops
RING_FRAME: Final = 2048
RING_RETIRE_MS: Final = 50  # a partly filled block is handed over after this long
DRAIN_S: Final = 2 * RING_RETIRE_MS / 1000 + 0.02
# In the background, under light load (the timer hands over blocks a quarter full or less),
# the loop lets this many blocks gather and reads them in one go. Each visit to the service's
# CPU costs the service's tail more than its CPU time says (a SCHED_IDLE loop that only
# spins costs nothing; one that reads does: colder caches, most likely), so a few long
# visits beat many short ones: bench/overhead.py --pin, the loop confined to the service's
# CPU, p99 x2.34 [1.69, 3.87] reading each 50 ms block as it came, x1.05 [0.97, 1.15] in
# batches of six, and half the loop's CPU (1.8 % of a CPU, then 0.9 %).
BATCH_BLOCKS: Final = 6
_LIGHT_BLOCK: Final = RING_BLOCK // 4
# Empty socket, or the bound interface went down (it may come back up; the error is cleared
# by the read that returned it).
_NOTHING_TO_READ: Final = (errno.EAGAIN, errno.ENETDOWN)
_BLOCK_HEADER: Final = struct.Struct("=2I")  # num_pkts, offset_to_first_pkt (at +12)
_SLL_HATYPE_AT: Final = 48 + 8  # sockaddr_ll follows the aligned tpacket3_hdr
# tpacket3_hdr up to tp_net, then (one read per frame) sockaddr_ll's sll_hatype
_FRAME_HEADER: Final = struct.Struct(f"=6I2H{_SLL_HATYPE_AT - 28}xH")

# DNS both ways on 53; from the service, UDP, connection attempts (SYN without ACK) and TLS
# ClientHello records (handshake 0x16, message type 1) at the start of a TCP payload. libpcap
# cannot index past IPv6 headers with tcp[], so IPv6 reads fixed offsets (no extension headers).
# Every packet the service sends or receives runs this program (bench/tapcost.py), so its order
# is the order of what rejects most traffic soonest: after the port-53 test, the source address
# turns away everything arriving; the payload-length test turns away the service's pure ACKs
# and FINs before the ClientHello test reads a payload byte (in a paged skb, through a helper).
_DNS: Final = "udp port 53 or tcp port 53"
_CLIENT_HELLO4: Final = (
    "(ip and tcp and ip[2:2] - ((ip[0] & 0xf) << 2) - ((tcp[12] & 0xf0) >> 2) > 5"
    " and tcp[((tcp[12] & 0xf0) >> 2)] = 0x16 and tcp[((tcp[12] & 0xf0) >> 2) + 5] = 1)"
)
_CLIENT_HELLO6: Final = (
    "(ip6 and ip6[6] = 6 and ip6[4:2] - ((ip6[52] & 0xf0) >> 2) > 5"
    " and ip6[40 + ((ip6[52] & 0xf0) >> 2)] = 0x16 and ip6[45 + ((ip6[52] & 0xf0) >> 2)] = 1)"
)
_SENT: Final = (
    "udp or (ip and tcp[tcpflags] & (tcp-syn|tcp-ack) = tcp-syn)"
    f" or (ip6 and ip6[6] = 6 and ip6[53] & 0x12 = 0x02) or {_CLIENT_HELLO4} or {_CLIENT_HELLO6}"
)
_BASE_FILTER: Final = f"{_DNS} or {_SENT}"
# Prepended to the compiled filter: drop anything on a loopback device before it is copied
# (classic BPF's ancillary load of the device type, linux/filter.h SKF_AD_HATYPE).
_SKF_AD_HATYPE: Final = (-0x1000 + 28) & 0xFFFFFFFF
_NOT_LOOPBACK: Final = struct.pack(
    "=HBBI HBBI HBBI",
    0x20, 0, 0, _SKF_AD_HATYPE,  # ld [hatype]
    0x15, 0, 1, ARPHRD_LOOPBACK,  # jeq #772, next, skip one
    0x06, 0, 0, 0,  # ret #0
)  # fmt: skip


def bpf_filter(service_addresses: list[str]) -> str:
    """The kernel filter: DNS, and the SYNs, ClientHellos and UDP the service's addresses send.

    A service accepts far more connections than it opens; the SYNs it accepts tell discovery
    nothing, so they never leave the kernel. Without a usable address list, every opening.
    """
    if not service_addresses or len(service_addresses) > MAX_FILTER_ADDRESSES:
        return _BASE_FILTER
    hosts = " or ".join(f"src host {a}" for a in sorted(service_addresses))
    return f"{_DNS} or (({hosts}) and ({_SENT}))"


def compile_bpf(expression: str) -> bytes:
    """The filter's classic BPF instructions (8 bytes each), loopback refused first."""
    from scapy.arch.common import compile_filter

    try:
        program = compile_filter(expression, linktype=DLT_RAW)
    except ImportError:
        raise CapabilityError(
            "libpcap is needed to compile the capture filter (apt-get install libpcap0.8)"
        ) from None
    import ctypes

    # The loopback test goes in front: jumps are relative, so the program after it holds.
    return _NOT_LOOPBACK + ctypes.string_at(program.bf_insns, program.bf_len * 8)


def attach_bpf(sock: socket.socket, instructions: bytes) -> None:
    """SO_ATTACH_FILTER: the kernel copies the program from a `struct sock_fprog`."""
    import ctypes

    program = ctypes.create_string_buffer(instructions, len(instructions))
    fprog = struct.pack("HL", len(instructions) // 8, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # copied: `program` may go


class Priority:
    """This thread's scheduling: SCHED_IDLE while the ring keeps up, its own policy otherwise.

    At SCHED_IDLE the packet loop runs only on CPU nothing else wants, so the service it
    watches never waits for it; the ring absorbs what arrives meanwhile. When the ring
    fills past a quarter (the service's host is busy for long, not in a burst) or the
    capture is ending, the loop takes its normal share again rather than lose packets.
    """

    def __init__(self) -> None:
        self.background = False
        self._own: tuple[int, os.sched_param] | None = None
        # Not Linux: the normal priority is correct, only less polite.
        with contextlib.suppress(OSError, AttributeError):
            if _may_leave_idle():  # else SCHED_IDLE would be for good: stay as we are
                self._own = os.sched_getscheduler(0), os.sched_getparam(0)

    def lower(self) -> None:
        if self._own is not None and not self.background:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            self.background = True

    def restore(self) -> None:
        if self._own is not None and self.background:
            os.sched_setscheduler(0, *self._own)
            self.background = False


def _may_leave_idle() -> bool:
    """Whether this thread could return from SCHED_IDLE (sched(7): CAP_SYS_NICE or RLIMIT_NICE)."""
    cap_sys_nice = 23
    with open("/proc/thread-self/status") as status:
        for line in status:
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> cap_sys_nice & 1:
                return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or 20 - os.getpriority(os.PRIO_PROCESS, 0) <= soft


class ClosesOnExit(ABC):
    """`with capture:` closes it, whichever tap it is."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LiveCapture(ClosesOnExit):
    """A packet socket in the target's namespace with the BPF filter attached."""

    tap: Final = "packet"

    def __init__(
        self,
        sock: socket.socket,
        interfaces: list[str],
        addresses: list[str],
        bound: bool = False,
    ) -> None:
        self._sock = sock
        self.interfaces = interfaces
        self.service_addresses = addresses
        # Hooked on its one interface only (True), or on every device of the namespace.
        self.bound = bound
        self.filter = ""
        self.kernel_drops = 0
        self.packet_count = 0
        self._ring: _Ring | None = None

    @classmethod
    def open(cls, target: Target) -> LiveCapture:
        """The capture, filtering from its first packet; see `bound` for what it hooks."""
        with entered(target):
            interfaces = sorted(n for _, n in socket.if_nameindex() if n != "lo")
            # One interface (a container, a pod, a launched command): the socket hooks that
            # device alone, so loopback traffic (a sidecar, a local cache) never reaches the
            # tap at all; on a shared hook even a packet the filter refuses in its first
            # instruction costs the service a call into the tap, and on transmit a clone of
            # the skb (bench/tapcost.py: 5 % of a loopback round trip). Protocol 0 until the
            # bind: no packet arrives before the filter is attached.
            bound = len(interfaces) == 1
            protocol = 0 if bound else socket.htons(ETH_P_ALL)
            try:
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, protocol)
            except PermissionError:
                raise CapabilityError(
                    "cannot open a packet socket: needs CAP_NET_RAW (run as root)"
                ) from None
            try:
                addresses = namespace_addresses()
                capture = cls(sock, interfaces, addresses, bound)
                capture._configure()
            except BaseException:
                sock.close()
                raise
        return capture

    def _configure(self) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.filter = bpf_filter(self.service_addresses)
        attach_bpf(self._sock, compile_bpf(self.filter))
        self._sock.setblocking(False)
        try:
            self._ring = _Ring(self._sock)
        except OSError:
            self._ring = None  # no TPACKET_V3 here: read the socket one packet at a time
        if self.bound:
            self._sock.bind((self.interfaces[0], ETH_P_ALL))
        else:
            # Packets queued before the filter was attached were not filtered: discard them.
            for _ in range(100_000):
                try:
                    self._sock.recv(65536)
                except BlockingIOError:
                    break
        self._read_drops()
        self.kernel_drops = 0

    def packets(
        self, duration_s: float, stop: threading.Event | None = None
    ) -> Iterator[tuple[float, Segment | None]]:
        """(time, segment) until `duration_s` passes or `stop` is set; lo is skipped."""
        for t, packet in self.frames(duration_s, stop):
            yield t, decode_ip(packet)

    def frames(
        self, duration_s: float, stop: threading.Event | None = None, background: bool = False
    ) -> Iterator[tuple[float, bytes]]:
        """(time, IP packet) until `duration_s` passes or `stop` is set; lo is skipped.

        `background`: read the ring at SCHED_IDLE while it keeps up (see Priority); the
        consumer runs in this generator's thread, so its work is background work too.
        """
        if self._ring is not None:
            priority = Priority() if background else None
            yield from self._ring_frames(self._ring, duration_s, stop, priority)
            return
        buffer = bytearray(1 << 18)  # GRO can hand over 64 KiB+ super-packets
        view = memoryview(buffer)
        deadline = time.monotonic() + duration_s
        last_stats = time.monotonic()
        try:
            while not (stop is not None and stop.is_set()):
                now = time.monotonic()
                if now >= deadline:
                    break
                if now - last_stats > 1.0:  # the kernel counter is 32 bits and resets on read
                    self._read_drops()
                    last_stats = now
                ready, _, _ = select.select([self._sock], [], [], min(POLL_S, deadline - now))
                if ready:
                    yield from self._held(buffer, view, BATCH)
            # What the socket already holds arrived before the end.
            yield from self._held(buffer, view, MAX_DRAIN)
        finally:
            view.release()
            self._read_drops()

    def _held(
        self, buffer: bytearray, view: memoryview, limit: int
    ) -> Iterator[tuple[float, bytes]]:
        """Up to `limit` packets the socket holds now, one `recv` each; loopback's left out."""
        for _ in range(limit):
            try:
                size, address = self._sock.recvfrom_into(buffer)
            except OSError as exc:
                if exc.errno not in _NOTHING_TO_READ:
                    raise
                return
            if address[3] != ARPHRD_LOOPBACK:
                self.packet_count += 1
                yield time.time(), bytes(view[:size])

    def _ring_frames(
        self,
        ring: _Ring,
        duration_s: float,
        stop: threading.Event | None,
        priority: Priority | None,
    ) -> Iterator[tuple[float, bytes]]:
        deadline = time.monotonic() + duration_s
        last_stats = time.monotonic()
        drain_until: float | None = None
        reading = False  # in a batch: read on until caught up
        try:
            while True:
                now = time.monotonic()
                if drain_until is None and (
                    now >= deadline or (stop is not None and stop.is_set())
                ):
                    # The block being filled reaches us only when the kernel retires it:
                    # wait that out, so what arrived before the end is not lost.
                    drain_until = now + DRAIN_S
                    if priority is not None:  # whoever stopped us waits for the drain
                        priority.restore()
                        priority = None
                if now - last_stats > 1.0:
                    self._read_drops()
                    last_stats = now
                block = ring.ready_block()
                if block is None:
                    reading = False
                    if drain_until is not None and now >= drain_until:
                        break
                    if priority is not None:
                        priority.lower()  # caught up
                    end = deadline if drain_until is None else drain_until
                    wait = max(0.0, min(POLL_S, end - now))
                    readable, _, _ = select.select([self._sock], [], [], wait)
                    if readable and ring.ready_block() is None:
                        # Not a block but an error: the bound interface went down (ENETDOWN).
                        # Reading it clears it, else select would return at once from now on.
                        self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    continue
                backlog = ring.backlog()
                if (
                    not reading
                    and priority is not None
                    and drain_until is None
                    and backlog < BATCH_BLOCKS
                    and ring.filled(block) <= _LIGHT_BLOCK
                ):
                    # The socket stays readable while a block waits: sleep, not select.
                    pause = min(RING_RETIRE_MS / 1000 * (BATCH_BLOCKS - backlog), deadline - now)
                    if stop is not None:
                        stop.wait(max(0.0, pause))
                    else:
                        time.sleep(max(0.0, pause))
                    continue
                reading = True
                if priority is not None and backlog >= RING_BLOCKS // 4:
                    priority.restore()
                try:
                    packets = ring.frames(block)
                    self.packet_count += len(packets)
                    yield from packets
                finally:
                    ring.release(block)
        finally:
            if priority is not None:
                priority.restore()
            self._read_drops()

    def _read_drops(self) -> None:
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        _, drops = struct.unpack("II", raw)
        self.kernel_drops += drops

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
        self._sock.close()


class _Ring:
    """A TPACKET_V3 receive ring: the kernel fills blocks of packets, we read them in place.

    One syscall per block instead of one per packet; layouts are the kernel's
    (linux/if_packet.h): tpacket_block_desc, tpacket3_hdr, then sockaddr_ll.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        frames = RING_BLOCK * RING_BLOCKS // RING_FRAME
        request = struct.pack(
            "=7I", RING_BLOCK, RING_BLOCKS, RING_FRAME, frames, RING_RETIRE_MS, 0, 0
        )
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, request)
        self._map = mmap.mmap(
            sock.fileno(),
            RING_BLOCK * RING_BLOCKS,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self._next = 0

    def ready_block(self) -> int | None:
        """The offset of the next block if the kernel has handed it to us."""
        offset = self._next * RING_BLOCK
        status = int.from_bytes(self._map[offset + 8 : offset + 12], "little")
        return offset if status & TP_STATUS_USER else None

    def frames(self, block: int) -> list[tuple[float, bytes]]:
        """The block's (time, IP packet)s, copied out; loopback's are left out."""
        count, first = _BLOCK_HEADER.unpack_from(self._map, block + 12)
        at = block + first
        end = block + RING_BLOCK
        ring = self._map
        unpack = _FRAME_HEADER.unpack_from
        last = end - _FRAME_HEADER.size
        packets: list[tuple[float, bytes]] = []
        append = packets.append
        for _ in range(count):
            if at > last:
                break
            step, sec, nsec, snaplen, _, _, _, net, hatype = unpack(ring, at)
            if hatype != ARPHRD_LOOPBACK:  # the filter refuses these: a second guard, cheap
                start = at + net
                append((sec + nsec / 1e9, ring[start : min(end, start + snaplen)]))
            if not step:
                break
            at += step
        return packets

    def filled(self, block: int) -> int:
        """Bytes the kernel wrote into a handed-over block (blk_len, headers included)."""
        return int.from_bytes(self._map[block + 20 : block + 24], "little")

    def backlog(self) -> int:
        """How many blocks, from the next one on, the kernel has filled and handed over."""
        ready = 0
        while ready < RING_BLOCKS:
            offset = (self._next + ready) % RING_BLOCKS * RING_BLOCK
            if not int.from_bytes(self._map[offset + 8 : offset + 12], "little") & TP_STATUS_USER:
                break
            ready += 1
        return ready

    def release(self, block: int) -> None:
        """Hand the block back to the kernel and move to the next one."""
        self._map[block + 8 : block + 12] = b"\0\0\0\0"
        self._next = (self._next + 1) % RING_BLOCKS

    def close(self) -> None:
        self._map.close()


def namespace_addresses() -> list[str]:
    """This thread's namespace's own addresses (the service sends from these)."""
    from pyroute2 import IPRoute

    found: set[str] = set()
    with IPRoute() as ipr:
        for message in ipr.get_addr():
            text = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
            if text:
                found.add(ipaddress.ip_address(text.split("%")[0]).compressed)
    return sorted(found)


def read_pcap(path: Path) -> Iterator[tuple[float, Segment | None]]:
    """(time, segment) for every packet of a pcap or pcapng file; unknown frames give None."""
    from scapy.error import Scapy_Exception
    from scapy.utils import RawPcapReader

    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; scapy leaks its own on errors
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a capture file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        try:
            reader = RawPcapReader(handle)  # type: ignore[arg-type]  # its metaclass takes files
        except (Scapy_Exception, EOFError, OSError, struct.error):
            raise InputError(f"{path}: not a pcap or pcapng capture file") from None
        try:
            default_linktype = getattr(reader, "linktype", 1)
            nano = bool(getattr(reader, "nano", False))
            for frame, meta in reader:
                linktype = getattr(meta, "linktype", default_linktype)
                yield _pcap_time(meta, nano), decode_frame(frame, linktype)
        except (Scapy_Exception, struct.error, OSError):
            raise InputError(f"{path}: corrupt capture file") from None
        finally:
            reader.close()


def _pcap_time(meta: Any, nano: bool) -> float:
    if hasattr(meta, "tsresol"):  # pcapng: a 64-bit count of units of 1/tsresol s
        return float(((meta.tshigh << 32) | meta.tslow) / meta.tsresol)
    return float(meta.sec + meta.usec / (1e9 if nano else 1e6))
