"""Packets in through netfilter: nft rules in the target's namespace log what discovery reads.

The packet socket (capture.LiveCapture) sees every packet of the devices it hooks, and each
one costs the service a call into the tap, filter or not (bench/tapcost.py: about 190 ns
for a filter that refuses at once, 265 ns for the capture). Here the kernel's own packet
path decides instead: an owner-flagged nft table in the service's namespace has two base
chains, input and output, whose few rules pass DNS (both ways, on port 53), the UDP the
service sends (once per flow every few seconds), its connection attempts (SYN without ACK)
and its TLS ClientHellos to an NFLOG group; every other packet meets those rule tests and
nothing else (120-130 ns here; see RULESET for what a logged packet costs).
This module binds the group on an nfnetlink_log socket and reads what the kernel batches
into it (up to NLBUFSIZ bytes, flushed every FLUSH_CS hundredths of a second).

What it sees, next to the packet socket: the namespace's own traffic only (input and
output hooks: nothing forwarded through it), IPv4 datagrams after reassembly, IPv6
ClientHellos behind extension headers, loopback never. Drops are exact: every logged
packet carries the group's sequence number, and a gap is a packet the kernel could not
hand over (the socket's buffer was full).

Safety: the table is owned by this process's netlink socket, so the kernel removes it when
the capture ends or the process dies, SIGKILL included. Removing a base chain makes the
kernel drop every packet an NFQUEUE holds in that namespace (nf_queue_nf_hook_drop), so
the capture is not opened where a queue is bound (`queues_in_use`): a user's IPS, or
depdrill's own latency fault, keep their packets, and discovery uses the packet socket.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Final

from depdrill.discover.capture import (
    POLL_S,
    RECEIVE_BUFFER,
    SO_RCVBUFFORCE,
    ClosesOnExit,
    Priority,
    namespace_addresses,
)
from depdrill.errors import CapabilityError
from depdrill.libnftables import NftContext, NftError
from depdrill.netlink import (
    ATTR,
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG,
    NLMSG_ERROR,
    attr,
    error_code,
    nfnl_message,
)
from depdrill.netns import Target, entered

NFNL_SUBSYS_ULOG: Final = 4
NFULNL_MSG_PACKET: Final = NFNL_SUBSYS_ULOG << 8 | 0
NFULNL_MSG_CONFIG: Final = 1
NFULA_CFG_CMD: Final = 1
NFULA_CFG_MODE: Final = 2
NFULA_CFG_NLBUFSIZ: Final = 3
NFULA_CFG_TIMEOUT: Final = 4
NFULA_CFG_QTHRESH: Final = 5
NFULA_CFG_FLAGS: Final = 6
NFULNL_CFG_CMD_BIND: Final = 1
NFULNL_CFG_CMD_UNBIND: Final = 2
NFULNL_COPY_PACKET: Final = 2
NFULNL_CFG_F_SEQ: Final = 0x0001
NFULA_MARK: Final = 2
NFULA_TIMESTAMP: Final = 3
NFULA_PAYLOAD: Final = 9
NFULA_SEQ: Final = 12
_ATTR_TYPE: Final = 0x3FFF  # without the nested and byte-order flags
_NFGEN_SIZE: Final = 4
_TIMESTAMP: Final = struct.Struct(">QQ")  # seconds, microseconds
_SEQ: Final = struct.Struct(">I")
_HEADER: Final = struct.Struct("=IH")  # the netlink header's length and type

COPY_RANGE: Final = 0xFFFF  # whole packets (DNS over TCP, ClientHellos); other UDP is cut
UDP_SNAPLEN: Final = 128  # enough for any IP header and the UDP ports: a flow, not its data
UDP_EVERY_S: Final = 5  # a known UDP flow is logged again after this long (its last-seen)
UDP_FLOWS: Final = 4096  # flows remembered per IP family (past it, each datagram is logged)
PORT_RANGE: Final = "/proc/sys/net/ipv4/ip_local_port_range"
NLBUFSIZ: Final = 131072  # the largest batch the kernel builds (one netlink message each)
FLUSH_CS: Final = 5  # a partly filled batch is handed over after 50 ms, like a ring block
QTHRESH: Final = 4096  # packets in a batch, at most (the buffer size ends most batches first)
READ_BUFFER: Final = 1 << 20  # a batch, or one logged 64 KiB packet with its attributes
GROUP_TRIES: Final = 16
# In the background, under light load, the loop lets batches gather this long and reads
# them in one go (the ring's BATCH_BLOCKS: few long visits to the CPU beat many short ones).
BATCH_PAUSE_S: Final = 0.3
_LIGHT_READ: Final = 4 * NLBUFSIZ  # bytes in one read round; more means keep reading
_BUSY_READ: Final = RECEIVE_BUFFER // 4  # past this the loop takes its normal priority again
DRAIN_ROUNDS: Final = 1 << 14
QUEUE_PROC: Final = "/proc/thread-self/net/netfilter/nfnetlink_queue"

# The last packet logged, sent by the capture itself at its end over loopback (it never
# leaves the namespace): when the socket overflowed, the kernel dropped whole batches, and
# only a later packet's sequence number shows how many packets they held. Loopback packets
# alone meet the mark test.
MARKER: Final = 0x64647063  # "ddpc"
MARKER_TO: Final = ("127.0.0.1", 9)  # discard: nothing need listen
SO_MARK: Final = 36
# Rules evaluated for every packet of the service. The loopback test comes first, by
# device type: libnftables resolves interface names through one cache for the whole
# process, which another thread's context may be emptying at that moment ("Interface does
# not exist"). Then tests that fail in one load for most traffic. `accept` ends this
# table's chain only (other tables still judge the packet), so a packet is logged once.
# `th` reads the transport header whatever the protocol; TCP and UDP are the only ones the
# dissector reads. Per packet (bench/tapcost.py --arms live,nflog): one not logged costs
# the service 120-130 ns, against 260-280 ns through the packet socket; one logged costs
# about 0.9 us, against 0.45 us copied to the packet socket's ring. Hence:
# - a ClientHello is looked for only in segments from the namespace's ephemeral ports
#   (`ports`, ip_local_port_range: where connect() picks them), so a server's responses
#   skip the payload test (150 ns a packet with it everywhere). A client that binds its
#   own source port below the range is still seen by its SYN, without SNI.
# - UDP that is not DNS is logged once per flow (four-tuple) every UDP_EVERY_S: the graph
#   counts flows, and a later datagram of a known flow only moves its last-seen time. A
#   full set logs every datagram again.
RULESET: Final = """table inet {table} {{
\tflags owner
\tset udp4 {{
\t\ttype ipv4_addr . inet_service . ipv4_addr . inet_service
\t\tflags dynamic,timeout; timeout {udp_every}s; size {udp_flows}
\t}}
\tset udp6 {{
\t\ttype ipv6_addr . inet_service . ipv6_addr . inet_service
\t\tflags dynamic,timeout; timeout {udp_every}s; size {udp_flows}
\t}}
\tchain in {{
\t\ttype filter hook input priority raw; policy accept;
\t\tmeta iiftype loopback accept
\t\tth sport 53 log group {group} accept
\t\tth dport 53 log group {group} accept
\t}}
\tchain out {{
\t\ttype filter hook output priority raw; policy accept;
\t\tmeta oiftype loopback jump loopback
\t\tth dport 53 log group {group} accept
\t\tth sport 53 log group {group} accept
\t\tmeta l4proto udp jump udp_out
\t\ttcp flags & (syn | ack) == syn log group {group} accept
\t\tth sport {ports} meta l4proto tcp @ih,0,8 0x16 @ih,40,8 0x01 log group {group} accept
\t}}
\tchain udp_out {{
\t\t{flow4} @udp4 accept
\t\t{flow6} @udp6 accept
\t\tadd @udp4 {{ {flow4} }} {log_udp}
\t\tadd @udp6 {{ {flow6} }} {log_udp}
\t\t{log_udp}
\t}}
\tchain loopback {{
\t\tmeta mark {marker:#x} log group {group}
\t\taccept
\t}}
}}
"""


class NflogUnavailable(CapabilityError):
    """This namespace cannot be captured through NFLOG; the packet socket can still serve."""


def queues_in_use() -> list[int]:
    """NFQUEUE queue numbers bound in this thread's namespace (their packets are at stake)."""
    try:
        with open(QUEUE_PROC) as listing:
            return sorted(int(line.split()[0]) for line in listing if line.strip())
    except FileNotFoundError:  # nfnetlink_queue not loaded: no queue anywhere
        return []


def ruleset(table: str, group: int, ports: tuple[int, int] = (32768, 60999)) -> str:
    """The capture's nft table; `ports`: the namespace's ephemeral port range."""
    return RULESET.format(
        table=table,
        group=group,
        flow4="ip saddr . udp sport . ip daddr . udp dport",
        flow6="ip6 saddr . udp sport . ip6 daddr . udp dport",
        log_udp=f"log group {group} snaplen {UDP_SNAPLEN} accept",
        udp_every=UDP_EVERY_S,
        udp_flows=UDP_FLOWS,
        ports=f"{ports[0]}-{ports[1]}",
        marker=MARKER,
    )


def ephemeral_ports() -> tuple[int, int]:
    """This thread's namespace's ip_local_port_range (the kernel's default if unreadable)."""
    try:
        with open(PORT_RANGE) as setting:
            low, high = (int(v) for v in setting.read().split())
    except (OSError, ValueError):
        return 32768, 60999
    return (low, high) if 0 < low <= high < 65536 else (32768, 60999)


def _marker_socket() -> socket.socket | None:
    """A UDP socket in this thread's namespace whose datagrams carry MARKER (None where it
    cannot be had: then a loss in the capture's last batches goes uncounted)."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARKER)
    except OSError:
        sock.close()
        return None
    return sock


class NflogCapture(ClosesOnExit):
    """An NFLOG group bound in the target's namespace, fed by an owner nft table of its own."""

    tap: Final = "nflog"

    def __init__(self, sock: socket.socket, interfaces: list[str], addresses: list[str]) -> None:
        self._sock = sock
        self.interfaces = interfaces
        self.service_addresses = addresses
        self.group = -1
        self.filter = ""
        self.kernel_drops = 0
        self.packet_count = 0
        self._nft: NftContext | None = None
        self._next_seq: int | None = None
        self._lock = threading.Lock()
        self._marker: socket.socket | None = None

    @classmethod
    def open(cls, target: Target, receive_buffer: int = RECEIVE_BUFFER) -> NflogCapture:
        """The capture, logging from the moment this returns.

        `receive_buffer`: bytes the socket holds for a reader that falls behind (32 MiB:
        seconds of heavy DNS); past it the kernel drops, and the sequence numbers count it.
        """
        with entered(target):
            queues = queues_in_use()
            if queues:
                raise NflogUnavailable(
                    f"NFQUEUE queue {queues[0]} is bound in this namespace, and an nflog "
                    "capture's end would drop the packets it holds (the packet tap can "
                    "capture there)"
                )
            interfaces = sorted(n for _, n in socket.if_nameindex() if n != "lo")
            addresses = namespace_addresses()
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            except OSError as exc:
                raise NflogUnavailable(f"no nfnetlink socket here: {exc.strerror}") from None
            capture = cls(sock, interfaces, addresses)
            try:
                capture._marker = _marker_socket()
                try:
                    capture._bind(receive_buffer)
                except OSError as exc:
                    raise NflogUnavailable(f"cannot bind an NFLOG group: {exc}") from None
                table = f"depdrill-capture-{os.getpid()}-{capture.group}"
                capture.filter = ruleset(table, capture.group, ephemeral_ports())
                try:
                    nft = NftContext()
                    capture._nft = nft
                    nft.run(capture.filter)
                except NftError as exc:
                    raise NflogUnavailable(f"nft refused the capture's rules: {exc}") from None
                except CapabilityError as exc:  # no libnftables
                    raise NflogUnavailable(str(exc)) from None
            except BaseException:
                capture.close()
                raise
        return capture

    def _bind(self, receive_buffer: int) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self._sock.bind((0, 0))
        refused = 0
        # Groups are per namespace; another listener's group answers EBUSY (or EPERM when it
        # is another socket's): try elsewhere. EPERM everywhere means no CAP_NET_ADMIN.
        for group in random.sample(range(1 << 15, 1 << 16), GROUP_TRIES):
            code = self._config(group, attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])))
            if code == 0:
                self.group = group
                break
            if code == errno.EPERM:
                refused += 1
                if refused >= 3:
                    raise NflogUnavailable("cannot bind an NFLOG group: needs CAP_NET_ADMIN")
            elif code != errno.EBUSY:
                raise NflogUnavailable(f"cannot bind an NFLOG group: {os.strerror(code)}")
        else:
            raise NflogUnavailable(f"no free NFLOG group in {GROUP_TRIES} tries")
        settings = (
            attr(NFULA_CFG_MODE, struct.pack(">IBx", COPY_RANGE, NFULNL_COPY_PACKET))
            + attr(NFULA_CFG_NLBUFSIZ, struct.pack(">I", NLBUFSIZ))
            + attr(NFULA_CFG_TIMEOUT, struct.pack(">I", FLUSH_CS))
            + attr(NFULA_CFG_QTHRESH, struct.pack(">I", QTHRESH))
            + attr(NFULA_CFG_FLAGS, struct.pack(">H", NFULNL_CFG_F_SEQ))
        )
        code = self._config(self.group, settings)
        if code:
            raise NflogUnavailable(
                f"cannot configure NFLOG group {self.group}: {os.strerror(code)}"
            )

    def _config(self, group: int, attrs: bytes) -> int:
        """One NFULNL_MSG_CONFIG for `group`; the errno of its acknowledgement (0: done)."""
        message = nfnl_message(
            NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, socket.AF_UNSPEC, group,
            NLM_F_REQUEST | NLM_F_ACK, 1, attrs,
        )  # fmt: skip
        self._sock.send(message)
        while True:  # before logging starts only the acknowledgement can arrive
            reply = self._sock.recv(65536)
            _, kind, *_ = NLMSG.unpack_from(reply)
            if kind == NLMSG_ERROR:
                return error_code(reply)

    def frames(
        self, duration_s: float, stop: threading.Event | None = None, background: bool = False
    ) -> Iterator[tuple[float, bytes]]:
        """(time, IP packet) until `duration_s` passes or `stop` is set; then what is pending.

        `background`: as LiveCapture.frames (SCHED_IDLE while it keeps up, and under light
        load batches gather for BATCH_PAUSE_S before they are read).
        """
        priority = Priority() if background else None
        buffer = bytearray(READ_BUFFER)
        view = memoryview(buffer)
        deadline = time.monotonic() + duration_s
        self._sock.setblocking(False)
        try:
            while not (stop is not None and stop.is_set()):
                now = time.monotonic()
                if now >= deadline:
                    break
                read = 0  # bytes
                for size, batch in self._held(view, DRAIN_ROUNDS):
                    read += size
                    yield from batch
                    if read > _BUSY_READ and priority is not None:
                        priority.restore()  # the host is busy for long: keep up, not lose
                if priority is not None:
                    priority.lower()
                if priority is not None and read and read < _LIGHT_READ:
                    pause = min(BATCH_PAUSE_S, deadline - time.monotonic())
                    if stop is not None:
                        stop.wait(max(0.0, pause))
                    else:
                        time.sleep(max(0.0, pause))
                    continue
                select.select([self._sock], [], [], max(0.0, min(POLL_S, deadline - now)))
            if priority is not None:  # whoever stopped us waits for the drain
                priority.restore()
            # Stop logging, and have the kernel hand over the batch it is still filling.
            self._stop_logging()
            for _, batch in self._held(view, DRAIN_ROUNDS):
                yield from batch
        finally:
            view.release()
            if priority is not None:
                priority.restore()

    def _held(
        self, view: memoryview, limit: int
    ) -> Iterator[tuple[int, list[tuple[float, bytes]]]]:
        """Each batch the socket holds now (its size, its packets), up to `limit` batches."""
        for _ in range(limit):
            try:
                size = self._sock.recv_into(view)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    continue  # the buffer overflowed: the sequence numbers count the loss
                if exc.errno == errno.EAGAIN:
                    return
                raise
            batch = self._batch(view, size, time.time())
            self.packet_count += len(batch)
            yield size, batch

    def _batch(self, view: memoryview, size: int, now: float) -> list[tuple[float, bytes]]:
        """A batch's packets, each with the best time it has; sequence gaps counted as drops.

        The kernel stamps what arrives (input) but not what the service sends (output).
        An unstamped packet was logged before the next stamped one in its batch and before
        this read, so it gets the earlier of the two: times stay in log order.

        One loop with its lookups bound locally: this runs for every packet (1.2 us a
        packet here, 1.7 with a method call per packet and per attribute).
        """
        header, field, stamped, word = _HEADER.unpack_from, ATTR.unpack_from, _TIMESTAMP, _SEQ
        stamps: list[float | None] = []
        payloads: list[bytes] = []
        expected, drops = self._next_seq, 0
        offset = 0
        while offset + NLMSG.size <= size:
            length, kind = header(view, offset)
            end = offset + length
            if length < NLMSG.size or end > size:
                break
            if kind == NFULNL_MSG_PACKET:
                at = offset + NLMSG.size + _NFGEN_SIZE
                stamp: float | None = None
                payload = b""
                marker = False
                while at + 4 <= end:
                    attr_length, attr_kind = field(view, at)
                    if attr_length < 4:
                        break
                    attr_kind &= _ATTR_TYPE
                    if attr_kind == NFULA_PAYLOAD:
                        payload = view[at + 4 : at + attr_length].tobytes()
                    elif attr_kind == NFULA_TIMESTAMP:
                        seconds, micros = stamped.unpack_from(view, at + 4)
                        stamp = seconds + micros / 1e6
                    elif attr_kind == NFULA_SEQ:
                        (seq,) = word.unpack_from(view, at + 4)
                        if expected is not None:
                            gap = (seq - expected) & 0xFFFFFFFF
                            drops += gap if gap < 1 << 31 else 0
                        expected = (seq + 1) & 0xFFFFFFFF
                    elif attr_kind == NFULA_MARK:
                        marker = word.unpack_from(view, at + 4)[0] == MARKER
                    at += (attr_length + 3) & ~3
                if not marker:
                    stamps.append(stamp)
                    payloads.append(payload)
            offset += (length + 3) & ~3
        self._next_seq = expected
        self.kernel_drops += drops
        timed: list[tuple[float, bytes]] = []
        upper = now
        for index in range(len(payloads) - 1, -1, -1):
            stamp = stamps[index]
            if stamp is not None and stamp < upper:
                upper = stamp
            timed.append((upper, payloads[index]))
        timed.reverse()
        return timed

    def _stop_logging(self) -> None:
        """Delete the table (nothing more is logged), then unbind: the kernel flushes the
        group's pending batch to this socket before the acknowledgement."""
        nft = self._take_table()
        if nft is None:  # not logging (any more)
            return
        if self._marker is not None:
            # Without loopback up it cannot go: then a loss in the last batches goes uncounted.
            with contextlib.suppress(OSError):
                self._marker.sendto(b"depdrill: end of capture", MARKER_TO)
        nft.close()  # the owner table goes with its socket
        message = nfnl_message(
            NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, socket.AF_UNSPEC, self.group, NLM_F_REQUEST, 2,
            attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND])),
        )  # fmt: skip
        with contextlib.suppress(OSError):
            self._sock.send(message)

    def _take_table(self) -> NftContext | None:
        """The context owning the capture's table, once (None: already taken, or never made)."""
        with self._lock:
            nft, self._nft = self._nft, None
        return nft

    def close(self) -> None:
        nft = self._take_table()
        if nft is not None:
            nft.close()
        if self._marker is not None:
            self._marker.close()
        self._sock.close()  # the kernel destroys the group's instance with its socket
