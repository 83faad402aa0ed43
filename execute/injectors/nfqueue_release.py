"""The NFQUEUE release process: holds queued packets and accepts each at its deadline.

Why a process of its own (measured with bench/latency.py on this 2-core box; before, a
thread of the runner held the packets):
- A thread of the runner shares the GIL with the probes and the sniffer, and a waiting
  thread asks for the GIL only after the 5 ms switch interval: with one busy thread in the
  process a 2 ms select() woke 5.3 ms late (p50), and the thread design's latency error
  became +5 ms at p50 and +23 to +924 ms at p99. This process runs nothing else and
  imports only the stdlib (and depdrill's netlink framing, which does too).
- Under CPU load from other processes a normal-priority releaser waits for a core. Here
  the releaser alone asks for SCHED_FIFO (when the capability exists; otherwise it stays
  SCHED_OTHER and says which in its ready line), with 1 ns timer slack; it sleeps until
  just before a deadline and polls the rest of the way. With two busy loops and a busy
  thread beside the runner, its verdicts leave at most 0.2 ms late at p99.
- It speaks nfnetlink_queue itself: one recv_into a preallocated buffer per packet, no
  per-packet Python object from a binding, and one batch verdict accepts every packet due
  (release times never decrease, so the due packets are always the oldest ids).

The process starts ahead of need, on standby (a Python interpreter takes 20-30 ms to
start; applying a fault should not). Its stdin is a Unix socket from the runner. The
runner opens and binds the queue's netlink socket inside the target namespace
(`open_queue`, so a refusal such as a queue bound by someone else is the runner's error)
and passes it over stdin with SCM_RIGHTS, with the queue number, delay and jitter; this
process then owns the only copy. When it ends, for any reason, the kernel unbinds the
queue and the rule's bypass flag lets traffic through. Told "end", it accepts everything
it holds and prints its statistics as one JSON line; at end of file on its stdin (the
runner closed it, or the runner died) it closes the queue's socket and exits (accepting
and reporting first if it had not been told "end").

    python -P -m depdrill.execute.injectors.nfqueue_release   # stdin: a Unix stream socket
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import json
import mmap
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections import deque

from depdrill.netlink import (
    ATTR,
    NETLINK_NETFILTER,
    NFGEN,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG,
    NLMSG_ERROR,
    attr,
    error_code,
    nfnl_message,
)

SO_RCVBUFFORCE = 33
SO_TIMESTAMP = 29
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQNL_CFG_CMD_BIND = 1
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_TIMESTAMP = 4
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1  # a full queue accepts packets instead of dropping them
NFQNL_COPY_META = 1
NF_ACCEPT = 1
ATTR_TYPE_MASK = 0x3FFF
PACKET_ID = struct.Struct("!I")
STAMP = struct.Struct("!QQ")
COUNTER = struct.Struct("=Q")

RECEIVE_BUFFER = 8 << 20
MESSAGE_BUFFER = 1 << 16  # COPY_META: a packet message is a few hundred bytes
RECEIVE_BUDGET = 64  # messages per turn, so a burst cannot hold back a due release
IDLE_WAIT_S = 0.1
# A kernel stamp older than this, or further ahead than the lead (a packet that arrived
# between reading the clock and reading the socket), is not this packet's arrival.
MAX_STAMP_AGE_S = 0.05
MAX_STAMP_LEAD_S = 0.001
# The releaser wakes early by the lateness it has measured (a moving average) and polls
# the rest of the way; the cap bounds the polling a SCHED_FIFO process may do per release.
# Before a long sleep (an idle core wakes slowest) it adds twice the mean deviation, which
# costs little polling at the rates where long sleeps happen.
WAKE_GAIN = 0.1
MAX_WAKE_ADVANCE_S = 0.0003
LONG_SLEEP_S = 0.002
FIFO_PRIORITY = 10
PR_SET_TIMERSLACK = 29
LATENESS_BUCKET_US = 10
LATENESS_BUCKETS = 1000  # 0-10 ms in 10 us steps, then one overflow bucket


def _message(kind: int, queue: int, attrs: bytes, flags: int, seq: int = 0) -> bytes:
    return nfnl_message(NFNL_SUBSYS_QUEUE, kind, socket.AF_UNSPEC, queue, flags, seq, attrs)


def open_queue(queue: int, max_held: int) -> socket.socket:
    """A netlink socket bound to NFQUEUE `queue` (copy metadata only, fail open when full).

    Raises OSError with the kernel's errno (EPERM: another socket has bound the queue).
    The socket belongs to the namespace of the thread that calls this.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        sock.bind((0, 0))
        attrs = (
            attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_UNSPEC))
            + attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
            + attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", max_held))
            + attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
            + attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
        )
        sock.send(_message(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq=1))
        reply = sock.recv(MESSAGE_BUFFER)
        _, kind, _, _, _ = NLMSG.unpack_from(reply)
        if kind != NLMSG_ERROR:
            raise OSError(errno.EPROTO, f"unexpected netlink reply type {kind}")
        code = error_code(reply)
        if code:
            raise OSError(code, os.strerror(code))
    except BaseException:
        sock.close()
        raise
    return sock


class Releaser:
    """The loop: receive packets, hold them in arrival order, accept them when due."""

    def __init__(
        self, sock: socket.socket, counter: mmap.mmap, queue: int, delay_s: float, jitter_s: float
    ) -> None:
        self.sock = sock
        self.counter = counter
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.held: deque[tuple[float, int]] = deque()
        self.last_release = 0.0
        self.wake_late_s = 0.0
        self.wake_spread_s = 0.0
        self.queued = 0
        self.stamped = 0
        self.overruns = 0  # ENOBUFS: the kernel could not hand us packets (it failed open)
        self.lateness = [0] * (LATENESS_BUCKETS + 1)
        self.random = random.Random()
        self.buffer = bytearray(MESSAGE_BUFFER)
        self.verdict = bytearray(
            _message(
                NFQNL_MSG_VERDICT_BATCH,
                queue,
                attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, 0)),
                NLM_F_REQUEST,
            )
        )
        self.verdict_id_at = len(self.verdict) - PACKET_ID.size

    def serve(self, control: int) -> bool:
        """Hold and release until the runner says "end" (True) or its end of file (False)."""
        sock = self.sock
        sock.setblocking(False)
        fd = sock.fileno()
        parent = os.getppid()
        waiting = [fd, control]
        while True:
            now = time.monotonic()
            if self.held and self.held[0][0] <= now:
                self._release_due(now)
            timeout = self._sleep_before(self.held[0][0] - now) if self.held else IDLE_WAIT_S
            # select() takes a timeout in microseconds; poll() and epoll only in milliseconds.
            ready, _, _ = select.select(waiting, [], [], max(timeout, 0.0))
            if fd in ready:
                self._receive()
            if control in ready:
                said = os.read(control, 4096)
                if not said or b"end" in said:
                    self._receive()  # marked just before the gate closed: released, not dropped
                    return bool(said)
            if not ready:
                if not self.held and os.getppid() != parent:
                    return False  # the runner is gone and someone else holds its socket
                if timeout > 0:
                    self._learn(time.monotonic() - now - timeout)

    def _sleep_before(self, due_in: float) -> float:
        """How long to sleep before polling for a release `due_in` seconds away."""
        advance = self.wake_late_s
        if due_in > LONG_SLEEP_S:
            advance = min(advance + 2 * self.wake_spread_s, MAX_WAKE_ADVANCE_S)
        return due_in - advance

    def _learn(self, late: float) -> None:
        late = min(late, MAX_WAKE_ADVANCE_S)
        self.wake_spread_s += (abs(late - self.wake_late_s) - self.wake_spread_s) * WAKE_GAIN
        self.wake_late_s += (late - self.wake_late_s) * WAKE_GAIN

    def _receive(self) -> None:
        sock, buffer = self.sock, self.buffer
        arrived = time.monotonic()
        wall = time.time()
        for _ in range(RECEIVE_BUDGET):
            try:
                size = sock.recv_into(buffer)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                continue
            self._parse(size, arrived, wall)
        COUNTER.pack_into(self.counter, 0, self.queued)

    def _parse(self, size: int, arrived: float, wall: float) -> None:
        buffer = self.buffer
        offset = 0
        while offset + NLMSG.size <= size:
            length, kind, _, _, _ = NLMSG.unpack_from(buffer, offset)
            if length < NLMSG.size:
                return
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                self._hold(offset, offset + length, arrived, wall)
            offset += (length + 3) & ~3

    def _hold(self, start: int, end: int, arrived: float, wall: float) -> None:
        buffer = self.buffer
        at = start + NLMSG.size + NFGEN.size
        packet_id = -1
        while at + ATTR.size <= end:
            length, kind = ATTR.unpack_from(buffer, at)
            if length < ATTR.size:
                break
            kind &= ATTR_TYPE_MASK
            if kind == NFQA_PACKET_HDR:
                (packet_id,) = PACKET_ID.unpack_from(buffer, at + ATTR.size)
            elif kind == NFQA_TIMESTAMP:
                seconds, micros = STAMP.unpack_from(buffer, at + ATTR.size)
                # The kernel stamps a received packet with wall-clock time; a locally sent
                # TCP segment may carry its departure time instead, which the check refuses.
                age = wall - (seconds + micros / 1e6)
                if -MAX_STAMP_LEAD_S <= age <= MAX_STAMP_AGE_S:
                    arrived -= age
                    self.stamped += 1
            at += (length + 3) & ~3
        if packet_id < 0:
            return
        wait = self.delay_s
        if self.jitter_s:
            wait = max(0.0, wait + self.random.uniform(-self.jitter_s, self.jitter_s))
        # Never overtake an earlier packet: jitter must not reorder a TCP stream, and the
        # batch verdict relies on release times that never decrease.
        release = max(arrived + wait, self.last_release)
        self.last_release = release
        self.queued += 1
        self.held.append((release, packet_id))

    def _release_due(self, now: float) -> None:
        held, lateness = self.held, self.lateness
        last = -1
        while held and held[0][0] <= now:
            release, last = held.popleft()
            bucket = int((now - release) * 1e6) // LATENESS_BUCKET_US
            lateness[min(bucket, LATENESS_BUCKETS)] += 1
        self._accept_through(last)

    def _accept_through(self, packet_id: int) -> None:
        """One batch verdict: the kernel accepts every packet of the queue up to this id."""
        PACKET_ID.pack_into(self.verdict, self.verdict_id_at, packet_id)
        with contextlib.suppress(BlockingIOError):
            self.sock.send(self.verdict)

    def release_all(self) -> None:
        if self.held:
            self._accept_through(self.held[-1][1])
            self.held.clear()

    def percentile_us(self, fraction: float) -> int | None:
        total = sum(self.lateness)
        if not total:
            return None
        rank = fraction * (total - 1)
        seen = 0
        for bucket, count in enumerate(self.lateness):
            seen += count
            if seen > rank:
                return (bucket + 1) * LATENESS_BUCKET_US
        return None


def scheduling() -> str:
    """Ask for SCHED_FIFO and no timer slack; say what this process got."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
    except OSError:
        return "other"  # no CAP_SYS_NICE, or the cgroup has no real-time budget
    return f"fifo:{FIFO_PRIORITY}"


def main() -> int:
    # Stdin is a Unix socket from the runner: its lifeline, and how the queue arrives.
    control = socket.socket(fileno=sys.stdin.fileno())
    # While one socket asks for receive timestamps the kernel stamps every packet it
    # receives, and NFQUEUE hands that stamp over with the packet.
    stamps = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stamps.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
    # A ^C reaches the whole process group: the runner handles it and then closes our
    # stdin. A SIGTERM meant for this process ends it, accepting what it holds.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_term)
    policy = scheduling()
    # The loop makes no reference cycles; a collection pass over the held packets would
    # only stall a release.
    gc.disable()
    try:
        arming = _await_queue(control) if _say(f"standby {policy}") else None
        if arming is None:
            return 0  # the runner went away, or no longer needs a queue held
        sock, counter, queue, delay_s, jitter_s = arming
        releaser = Releaser(sock, counter, queue, delay_s, jitter_s)
        began = time.monotonic()
        asked_to_end = False
        try:
            if _say(f"ready {policy}"):
                asked_to_end = releaser.serve(control.fileno())
        finally:
            releaser.release_all()
        summary = {
            "policy": policy,
            "queued": releaser.queued,
            "stamped": releaser.stamped,
            "overruns": releaser.overruns,
            "late_p50_us": releaser.percentile_us(0.5),
            "late_p99_us": releaser.percentile_us(0.99),
            "late_max_us": releaser.percentile_us(1.0),
            "seconds": round(time.monotonic() - began, 3),
            "cpu_s": round(sum(os.times()[:2]), 3),
            "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
        }
        # The runner's revert goes on at this line. What is left runs as an ordinary
        # process: at SCHED_FIFO it would take a core from the runner.
        _say(json.dumps(summary))
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        if asked_to_end:
            # The queue stays bound until the runner has deleted its tables: unbinding it
            # meanwhile slows that deletion 10-30x here (0.5 ms became 5-16 ms).
            with contextlib.suppress(OSError):
                while os.read(control.fileno(), 4096):
                    pass
        sock.close()
    finally:
        stamps.close()
    # Nothing is buffered (every line went out through os.write), and an interpreter's
    # orderly exit costs 15-20 ms of CPU the box's other work can use.
    os._exit(0)


def _await_queue(
    control: socket.socket,
) -> tuple[socket.socket, mmap.mmap, int, float, float] | None:
    """Wait on standby for "QUEUE DELAY_S JITTER_S" with the queue's socket and counter."""
    try:
        message, fds, _, _ = socket.recv_fds(control, 256, 2)
    except OSError:
        return None
    if len(fds) != 2 or not message:
        for fd in fds:
            os.close(fd)
        return None
    words = message.decode().split()
    sock = socket.socket(fileno=fds[0])
    counter = mmap.mmap(fds[1], COUNTER.size)
    os.close(fds[1])
    return sock, counter, int(words[0]), float(words[1]), float(words[2])


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _say(line: str) -> bool:
    """One line to the runner; False if the runner is gone (then nobody is listening)."""
    try:
        os.write(sys.stdout.fileno(), f"{line}\n".encode())
    except BrokenPipeError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
