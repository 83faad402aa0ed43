"""Latency through NFQUEUE, for kernels without sch_netem: packets wait in user space.

Two owner-flagged tables per fault, both made in-process over netlink (0.1-1 ms each):
- the gate (libnftables, family inet) marks the dependency's packets: its sets hold the
  addresses, with a timeout at the fault's deadline;
- the queue tables (ip and ip6, raw netlink: `nftnl`) send marked packets to an NFQUEUE.
  nft's own `queue` expression is often compiled out (as here), so the rule runs the
  xtables NFQUEUE target through nft_compat, with the bypass flag.
A release process (nfqueue_release), reading a netlink socket born inside the namespace,
holds each packet and gives its verdict once the delay (plus jitter) has passed, in
arrival order. It is started ahead of need (`preflight`), so applying a fault does not
wait for an interpreter to start.

The receive path (packets from the dependency, the input hook) is delayed by default:
that adds the same round-trip time as delaying what the service sends, but keeps TCP
throughput what that RTT allows. Holding the service's own outgoing packets in a queue
keeps them charged to the socket, and TCP small queues then starve the flow (measured
here: 14 Gbit/s fell to 0.3 Mbit/s at 100 ms on output, against 237 Mbit/s on input).

Nothing outlives this process: the kernel removes owner tables when their socket closes
(SIGKILL included); with no reader bound the bypass flag accepts the packets; the release
process ends with its stdin, a socket from this process. At the deadline the gate's set
elements time out, so the fault ends in the kernel even if this process hangs.

Reverting stops the gate first (its rules are flushed), then releases what the queue
holds, and only then deletes the tables: the kernel drops every packet waiting in any
queue of the namespace when a netfilter hook is unregistered (nf_queue_nf_hook_drop),
and deleting a base chain unregisters one.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import mmap
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from depdrill.errors import DepdrillError
from depdrill.execute.injectors.base import (
    FaultContext,
    InjectorError,
    KernelObject,
    Plan,
    Refusal,
)
from depdrill.execute.injectors.nfqueue_release import COUNTER, open_queue
from depdrill.execute.injectors.nftnl import FAMILIES, NetlinkError, NftSocket, QueueRule
from depdrill.execute.injectors.scope import (
    DNS_PORT,
    Scope,
    check,
    milliseconds_until,
    next_serial,
    refusal,
    scope_of,
)
from depdrill.execute.model import ErrorReason
from depdrill.generate.model import Fault, LatencyFault
from depdrill.libnftables import NftContext, NftError, library
from depdrill.netns import Target, entered

# Queue numbers depdrill uses (0xdd00-0xddff), so they never meet an application's queues.
QUEUE_BASE = 0xDD00
QUEUE_SPAN = 256
MAX_HELD = 65536  # packets the kernel keeps for the queue (then it accepts them: fail open)
RELEASE_MODULE = "depdrill.execute.injectors.nfqueue_release"
START_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0
HANDLES = (LatencyFault,)
# The gate marks the dependency's packets with these bits at priority -200; the queue
# tables, later on the same hook, send marked packets to the queue and nothing else.
GATE_MARK = 0x0DD00000
GATE_PRIORITY = -200
GATE_FAMILY = "inet"
QUEUE_PRIORITY = 0


def queue_number(serial: int) -> int:
    return QUEUE_BASE + (os.getpid() * 7 + serial) % QUEUE_SPAN


def gate_ruleset(table: str, scope: Scope, direction: str, timeout_ms: int) -> str:
    """The owner-flagged table that marks the packets the queue rule may take."""
    receive = direction == "receive"
    hook, addr, port = ("input", "saddr", "sport") if receive else ("output", "daddr", "dport")
    protocols = ", ".join(scope.protocols)
    transport = f"meta l4proto {{ {protocols} }} "
    if scope.ports:
        transport += f"th {port} {{ {', '.join(str(p) for p in scope.ports)} }} "
    else:
        transport += f"th {port} != {DNS_PORT} "
    lines = [f"table {GATE_FAMILY} {table} {{", "\tflags owner;"]
    for name, kind, members in (
        ("dependency4", "ipv4_addr", scope.ipv4),
        ("dependency6", "ipv6_addr", scope.ipv6),
    ):
        lines += [f"\tset {name} {{", f"\t\ttype {kind}; flags timeout;"]
        if members:
            elements = ", ".join(f"{a} timeout {timeout_ms}ms" for a in members)
            lines.append(f"\t\telements = {{ {elements} }}")
        lines.append("\t}")
    mark = f"meta mark set meta mark or 0x{GATE_MARK:08x}"
    lines += [
        "\tchain gate {",
        f"\t\ttype filter hook {hook} priority {GATE_PRIORITY}; policy accept;",
        f"\t\tip {addr} @dependency4 {transport}counter {mark}",
        f"\t\tip6 {addr} @dependency6 {transport}counter {mark}",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def queue_rules(table: str, direction: str, queue: int) -> list[QueueRule]:
    """The queue tables, one per IP family, on the gate's hook and after it."""
    hook = "input" if direction == "receive" else "output"
    return [
        QueueRule(family, f"{table}_q", hook, QUEUE_PRIORITY, GATE_MARK, queue)
        for family in FAMILIES
    ]


class _Releaser:
    """A release process on standby: started, scheduled, waiting for a queue on its stdin."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", RELEASE_MODULE],
                stdin=theirs.fileno(),
                stdout=subprocess.PIPE,
            )
        except OSError as exc:
            ours.close()
            raise InjectorError(
                ErrorReason.APPLY_FAILED, f"cannot start the NFQUEUE release process: {exc}"
            ) from None
        finally:
            theirs.close()
        self.control = ours
        self._pending = b""
        words = self.read_line(START_TIMEOUT_S).split()
        if len(words) != 2 or words[0] != "standby":
            self.end(kill=True)
            raise InjectorError(
                ErrorReason.APPLY_FAILED, "the NFQUEUE release process did not start"
            )
        self.policy = words[1]

    def read_line(self, timeout_s: float) -> str:
        """Its next line, or "" if none came within `timeout_s` (or it has exited)."""
        stdout = self.process.stdout
        assert stdout is not None
        give_up = time.monotonic() + timeout_s
        # Unbuffered reads: two lines written at once must not hide the second in a buffer
        # that select() cannot see.
        while b"\n" not in self._pending:
            ready, _, _ = select.select([stdout], [], [], max(0.0, give_up - time.monotonic()))
            chunk = os.read(stdout.fileno(), 4096) if ready else b""
            if not chunk:
                return ""
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def end(self, kill: bool = False) -> None:
        """Close its lifeline (it releases what it holds and exits); reap it in the background."""
        if kill:
            self.process.kill()
        self.control.close()
        threading.Thread(target=self._reap, name="nfqueue-reap", daemon=True).start()

    def _reap(self) -> None:
        self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


class _Standby:
    """At most one release process started ahead of need, for the next apply to take."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spare: _Releaser | None = None

    def warm(self) -> None:
        with self._lock:
            if self._spare is not None:
                if self._spare.alive:
                    return
                self._spare.end()
            self._spare = None
            self._spare = _Releaser()

    def take(self) -> _Releaser:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.alive:
            return spare
        if spare is not None:
            spare.end()
        return _Releaser()

    @property
    def spare_pid(self) -> int | None:
        """The process waiting on standby, if one is."""
        with self._lock:
            return None if self._spare is None else int(self._spare.process.pid)

    def discard(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.end()
            spare.process.wait()


STANDBY = _Standby()
atexit.register(STANDBY.discard)


class DelayQueue:
    """Holds every packet of one NFQUEUE queue for `delay_s` (+ jitter), then accepts it.

    The holding happens in a release process of its own (nfqueue_release says why); this
    object binds the queue inside the target namespace, hands it to a release process on
    standby, and ends it.
    """

    def __init__(self, target: Target, queue: int, delay_s: float, jitter_s: float) -> None:
        self.queue = queue
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.stats: dict[str, Any] = {}
        releaser = STANDBY.take()
        try:
            # The netlink socket belongs to the namespace of the thread that opens it.
            with entered(target):
                sock = open_queue(queue, MAX_HELD)
        except OSError as exc:
            releaser.end()
            why = str(exc)
            if exc.errno == errno.EPERM:
                why = "bound by another process (or this one lacks CAP_NET_ADMIN)"
            raise InjectorError(
                ErrorReason.APPLY_FAILED, f"cannot bind NFQUEUE {queue}: {why}"
            ) from None
        counter_fd = os.memfd_create("depdrill-nfqueue-count", os.MFD_CLOEXEC)
        try:
            os.ftruncate(counter_fd, COUNTER.size)
            self._counter = mmap.mmap(counter_fd, COUNTER.size)
            # The release process gets the only copy of the socket: when it ends, however
            # it ends, the queue is unbound.
            arming = f"{queue} {delay_s!r} {jitter_s!r}".encode()
            socket.send_fds(releaser.control, [arming], [sock.fileno(), counter_fd])
        except OSError as exc:
            releaser.end(kill=True)
            raise InjectorError(
                ErrorReason.APPLY_FAILED, f"cannot hand NFQUEUE {queue} to its releaser: {exc}"
            ) from None
        finally:
            sock.close()
            os.close(counter_fd)
        # Its "ready" line is read at the end, not waited for: the queue is bound already,
        # and what arrives before the process reads it waits in the socket, stamped.
        self._releaser = releaser
        self._released = False
        self.policy = releaser.policy

    @property
    def queued(self) -> int:
        """Packets that entered the delay queue so far."""
        if self._counter.closed:
            return int(self.stats.get("queued", 0))
        (count,) = COUNTER.unpack_from(self._counter)
        return int(count)

    @property
    def pid(self) -> int:
        return int(self._releaser.process.pid)

    def close(self) -> None:
        """Release every held packet at once and unbind (the kernel then bypasses)."""
        if self._counter.closed:
            return
        self.release()
        # End of file: it unbinds the queue and exits, in its own time; a thread reaps it.
        self._releaser.end()
        self.stats.setdefault("queued", self.queued)
        self._counter.close()

    def release(self) -> None:
        """Accept every held packet now and stop holding; the queue stays bound until close."""
        if self._counter.closed or self._released:
            return
        self._released = True
        # Told "end", it accepts what it holds and prints its statistics.
        with contextlib.suppress(OSError):
            self._releaser.control.sendall(b"end\n")
        took = self._releaser.read_line(CLOSE_TIMEOUT_S).startswith("ready ")
        summary = self._releaser.read_line(CLOSE_TIMEOUT_S) if took else ""
        with contextlib.suppress(ValueError):
            self.stats = json.loads(summary)
        if not summary:
            self._releaser.process.kill()


@dataclass
class NfqueueLatencyHandle:
    rules: list[str]
    target: Target
    delay: DelayQueue
    gate: NftContext
    table: str
    queue: NftSocket
    queue_tables: list[QueueRule]
    reverted: bool = field(default=False)

    def matched(self) -> int | None:
        """Packets that went through the delay queue."""
        return self.delay.queued


class NfqueueLatency:
    name: ClassVar[str] = "nfqueue-latency"

    def available(self) -> str | None:
        # The release process speaks nfnetlink_queue itself, and the queue rule is sent as
        # raw nf_tables netlink: libnftables (for the gate) is all this needs in user space.
        try:
            library()
        except DepdrillError as exc:
            return str(exc)
        return None

    def preflight(self, fault: Fault, ctx: FaultContext) -> Refusal | None:
        """The scope's checks; then a release process is started for the apply to come."""
        refused = refusal(fault, ctx, HANDLES, self.available())
        if refused is None:
            with contextlib.suppress(InjectorError):  # apply starts one and says why
                STANDBY.warm()
        return refused

    def plan(self, fault: Fault, ctx: FaultContext) -> Plan:
        check(fault, ctx, HANDLES)
        assert isinstance(fault, LatencyFault)
        serial = next_serial()
        scope = scope_of(fault)
        table = f"depdrill_{ctx.run_id}_{serial}"
        gate = gate_ruleset(table, scope, fault.direction, milliseconds_until(ctx.deadline))
        queues = queue_rules(table, fault.direction, queue_number(serial))
        return Plan(
            injector=self.name,
            fault=fault,
            ctx=ctx,
            rules=[gate, *(q.text() for q in queues)],
            objects=[
                KernelObject(kind="nft-table", name=table, where=GATE_FAMILY),
                *(KernelObject(kind="nft-table", name=q.table, where=q.family) for q in queues),
            ],
        )

    def rules(self, fault: Fault, ctx: FaultContext) -> list[str]:
        return self.plan(fault, ctx).rules

    def apply_plan(self, plan: Plan) -> NfqueueLatencyHandle:
        fault = plan.fault
        assert isinstance(fault, LatencyFault)
        table = plan.objects[0].name
        queues = queue_rules(table, fault.direction, _queue_of(plan))
        # The reader is bound before any rule can send it a packet.
        delay = DelayQueue(plan.ctx.target, queues[0].queue, fault.delay_ms / 1000,
                           fault.jitter_ms / 1000)  # fmt: skip
        try:
            with entered(plan.ctx.target):
                gate = NftContext()
                queue = NftSocket()
        except (DepdrillError, OSError) as exc:
            delay.close()
            raise InjectorError(ErrorReason.APPLY_FAILED, f"cannot open netlink: {exc}") from None
        try:
            # Queue tables first: they take only marked packets, and nothing is marked yet.
            queue.add(*queues)
            gate.run(plan.rules[0])
        except (NftError, NetlinkError) as exc:
            _close_quietly(gate, queue)
            delay.close()
            why = str(exc)
            if isinstance(exc, NetlinkError) and exc.errno in (errno.ENOENT, errno.EOPNOTSUPP):
                why += " (the kernel needs nft_compat and xt_NFQUEUE for the queue rule)"
            raise InjectorError(ErrorReason.APPLY_FAILED, why) from None
        return NfqueueLatencyHandle(
            rules=list(plan.rules),
            target=plan.ctx.target,
            delay=delay,
            gate=gate,
            table=table,
            queue=queue,
            queue_tables=queues,
        )

    def apply(self, fault: Fault, ctx: FaultContext) -> NfqueueLatencyHandle:
        return self.apply_plan(self.plan(fault, ctx))

    def revert(self, handle: Any) -> None:
        if not isinstance(handle, NfqueueLatencyHandle):
            raise TypeError(f"not an nfqueue-latency handle: {handle!r}")
        if handle.reverted:
            return
        # Deleting the table below stops the gate too, if flushing it fails (a held packet
        # may then be lost).
        try:
            with contextlib.suppress(NftError):
                # Nothing is marked any more, so nothing more is queued ...
                handle.gate.run(f"flush chain {GATE_FAMILY} {handle.table} gate\n")
        finally:
            # ... then what the queue holds is released, before any hook is unregistered
            # (that would drop it) ...
            handle.delay.release()
            # ... and then the tables go, while the queue is still bound (see
            # nfqueue_release), and then the queue. The sockets own the tables: closing
            # one removes its tables anyway, but takes the kernel 7-15 ms, which the revert
            # need not wait for once they are deleted; when a delete fails, it waits.
            deleted = _delete_quietly(handle)
            handle.delay.close()
            closing = threading.Thread(
                target=_close_quietly, args=(handle.gate, handle.queue), name="nft-close"
            )
            closing.start()
            if not deleted:
                closing.join()
        handle.reverted = True


def _queue_of(plan: Plan) -> int:
    """The queue number plan() chose, read back from the queue table's rule text."""
    words = plan.rules[1].split()
    return int(words[words.index("num") + 1])


def _delete_quietly(handle: NfqueueLatencyHandle) -> bool:
    try:
        for rule in handle.queue_tables:
            handle.queue.delete(rule.family, rule.table)
        handle.gate.run(f"delete table {GATE_FAMILY} {handle.table}\n")
    except (NftError, NetlinkError):
        return False
    return True


def _close_quietly(gate: NftContext, queue: NftSocket) -> None:
    gate.close()
    queue.close()
