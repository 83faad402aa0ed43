"""Latency through NFQUEUE, for kernels without sch_netem: packets wait in user space.

An iptables-legacy rule in the target namespace queues the dependency's packets (nft's own
`queue` expression is often compiled out, as here); a release process (nfqueue_release),
reading a netlink socket born inside the namespace, holds each packet and gives its verdict
once the delay (plus jitter) has passed, in arrival order.

The receive path (packets from the dependency, mangle INPUT) is delayed by default: that
adds the same round-trip time as delaying what the service sends, but keeps TCP throughput
what that RTT allows. Holding the service's own outgoing packets in a queue keeps them
charged to the socket, and TCP small queues then starve the flow (measured here: 14 Gbit/s
fell to 0.3 Mbit/s at 100 ms on OUTPUT, against 237 Mbit/s on INPUT).

`--queue-bypass` means a dead reader costs nothing: with no socket bound to the queue the
kernel accepts the packets (measured: traffic flows again within 2 ms of a SIGKILL). The
release process ends when this process does (its stdin is a pipe from here). And the
queue rule only takes packets an owner-flagged nft table of this process has marked
(the gate), so if this process dies the rule matches nothing the moment the kernel drops
the table, and at the deadline the gate's set elements time out: the fault ends in the
kernel even if no depdrill process is left to end it. The watchdog removes the rule.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import select
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

from depdrill.errors import DepdrillError
from depdrill.execute.injectors import iptables
from depdrill.execute.injectors.base import (
    FaultContext,
    InjectorError,
    KernelObject,
    Plan,
    Refusal,
)
from depdrill.execute.injectors.libnftables import NftContext, NftError, library
from depdrill.execute.injectors.nfqueue_release import COUNTER, open_queue
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
from depdrill.netns import Target, entered

# Queue numbers depdrill uses (0xdd00-0xddff), so they never meet an application's queues.
QUEUE_BASE = 0xDD00
QUEUE_SPAN = 256
MAX_HELD = 65536  # packets the kernel keeps for the queue (then it accepts them: fail open)
RELEASE_MODULE = "depdrill.execute.injectors.nfqueue_release"
START_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0
HANDLES = (LatencyFault,)
# The gate: an owner-flagged nft table marks the dependency's packets with these bits before
# iptables sees them (nft priority -200 runs before iptables mangle at -150), and the queue
# rule matches only marked packets. If this process dies the kernel removes the table and
# the rule matches nothing at once; at the deadline the set elements time out, likewise.
GATE_MARK = 0x0DD00000
GATE_PRIORITY = -200
GATE_FAMILY = "inet"


def queue_number(serial: int) -> int:
    return QUEUE_BASE + (os.getpid() * 7 + serial) % QUEUE_SPAN


def tag(run_id: str, serial: int) -> str:
    return f"{iptables.TAG_PREFIX}{run_id}:{serial}"


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


def build_rules(scope: Scope, direction: str, queue: int, comment: str) -> list[iptables.Rule]:
    """One rule per address and protocol: exact specs to insert and, later, to delete."""
    receive = direction == "receive"
    chain = "INPUT" if receive else "OUTPUT"
    peer = "-s" if receive else "-d"
    port_flag = "--sport" if receive else "--dport"
    rules = []
    for address in scope.addresses:
        binary = iptables.BINARIES[6 if ":" in address else 4]
        for protocol in scope.protocols:
            spec = [peer, address, "-p", protocol]
            if scope.ports:
                ports = ",".join(str(p) for p in scope.ports)
                spec += ["-m", "multiport", f"{port_flag}s", ports]
            else:
                spec += ["!", port_flag, str(DNS_PORT)]
            spec += ["-m", "mark", "--mark", f"0x{GATE_MARK:x}/0x{GATE_MARK:x}"]
            spec += ["-m", "comment", "--comment", comment]
            spec += ["-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]
            rules.append(iptables.Rule(binary=binary, chain=chain, spec=tuple(spec)))
    return rules


class DelayQueue:
    """Holds every packet of one NFQUEUE queue for `delay_s` (+ jitter), then accepts it.

    The holding happens in a release process of its own (nfqueue_release says why); this
    object binds the queue inside the target namespace, starts that process, and ends it.
    """

    def __init__(self, target: Target, queue: int, delay_s: float, jitter_s: float) -> None:
        self.queue = queue
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.stats: dict[str, Any] = {}
        try:
            # The netlink socket belongs to the namespace of the thread that opens it.
            with entered(target):
                sock = open_queue(queue, MAX_HELD)
        except OSError as exc:
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
            # The release process gets the only copy of the socket: when it ends, however it
            # ends, the queue is unbound. Its stdin is its lifeline to this process.
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-P",
                    "-m",
                    RELEASE_MODULE,
                    str(sock.fileno()),
                    str(counter_fd),
                    str(queue),
                    repr(delay_s),
                    repr(jitter_s),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(sock.fileno(), counter_fd),
                text=True,
            )
        except OSError as exc:
            raise InjectorError(
                ErrorReason.APPLY_FAILED, f"cannot start the NFQUEUE release process: {exc}"
            ) from None
        finally:
            sock.close()
            os.close(counter_fd)
        self.policy = self._await_ready()

    def _await_ready(self) -> str:
        stdout = self._process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], START_TIMEOUT_S)
        words = stdout.readline().split() if ready else []
        if len(words) != 2 or words[0] != "ready":
            self._end(kill=True)
            raise InjectorError(
                ErrorReason.APPLY_FAILED,
                f"the NFQUEUE release process for queue {self.queue} did not start",
            )
        return words[1]

    @property
    def queued(self) -> int:
        """Packets that entered the delay queue so far."""
        if self._counter.closed:
            return int(self.stats.get("queued", 0))
        (count,) = COUNTER.unpack_from(self._counter)
        return int(count)

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        """Release every held packet at once and unbind (the kernel then bypasses)."""
        if not self._counter.closed:
            self._end(kill=False)

    def _end(self, kill: bool) -> None:
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        if kill:
            process.kill()
        # End of file on its stdin: it accepts what it holds, closes the queue's socket,
        # and then prints its statistics. Its interpreter's exit (15-20 ms here) is not
        # waited for; a thread reaps it.
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        ready, _, _ = select.select([process.stdout], [], [], CLOSE_TIMEOUT_S)
        summary = process.stdout.readline() if ready else ""
        with contextlib.suppress(ValueError):
            self.stats = json.loads(summary)
        if not summary:
            process.kill()
        self.stats.setdefault("queued", self.queued)
        self._counter.close()
        threading.Thread(target=self._reap, name="nfqueue-reap", daemon=True).start()

    def _reap(self) -> None:
        self._process.wait()
        assert self._process.stdout is not None
        self._process.stdout.close()


@dataclass
class NfqueueLatencyHandle:
    rules: list[str]
    target: Target
    installed: list[iptables.Rule]
    comment: str
    delay: DelayQueue
    gate: NftContext
    table: str
    reverted: bool = field(default=False)

    def matched(self) -> int | None:
        """Packets that went through the delay queue."""
        return self.delay.queued


class NfqueueLatency:
    name: ClassVar[str] = "nfqueue-latency"

    def available(self) -> str | None:
        # The release process speaks nfnetlink_queue itself: no libnetfilter_queue binding.
        from shutil import which

        if which("iptables-legacy-restore") is None:
            return "iptables-legacy is not installed (apt install iptables)"
        try:
            library()
        except DepdrillError as exc:
            return str(exc)
        return None

    def preflight(self, fault: Fault, ctx: FaultContext) -> Refusal | None:
        return refusal(fault, ctx, HANDLES, self.available())

    def plan(self, fault: Fault, ctx: FaultContext) -> Plan:
        check(fault, ctx, HANDLES)
        assert isinstance(fault, LatencyFault)
        serial = next_serial()
        scope = scope_of(fault)
        table = f"depdrill_{ctx.run_id}_{serial}"
        gate = gate_ruleset(table, scope, fault.direction, milliseconds_until(ctx.deadline))
        rules = build_rules(scope, fault.direction, queue_number(serial), tag(ctx.run_id, serial))
        return Plan(
            injector=self.name,
            fault=fault,
            ctx=ctx,
            rules=[gate, *(r.command() for r in rules)],
            objects=[
                KernelObject(kind="nft-table", name=table, where=GATE_FAMILY),
                *(
                    KernelObject(
                        kind="iptables-rule",
                        name=tag(ctx.run_id, serial),
                        where=r.where,
                        spec=shlex.join(r.spec),
                    )
                    for r in rules
                ),
            ],
        )

    def rules(self, fault: Fault, ctx: FaultContext) -> list[str]:
        return self.plan(fault, ctx).rules

    def apply_plan(self, plan: Plan) -> NfqueueLatencyHandle:
        fault = plan.fault
        assert isinstance(fault, LatencyFault)
        table = next(o for o in plan.objects if o.kind == "nft-table")
        tagged = [o for o in plan.objects if o.kind == "iptables-rule"]
        installed = [
            iptables.Rule(
                binary=o.where.split()[0], chain=o.where.split()[2], spec=tuple(shlex.split(o.spec))
            )
            for o in tagged
        ]
        queue = int(installed[0].spec[installed[0].spec.index("--queue-num") + 1])
        # The reader is bound before the rule exists: no packet ever waits for nobody.
        delay = DelayQueue(plan.ctx.target, queue, fault.delay_ms / 1000, fault.jitter_ms / 1000)
        with entered(plan.ctx.target):
            gate = NftContext()
        try:
            gate.run(plan.rules[0])
            iptables.install(plan.ctx.target, installed)
        except (NftError, iptables.IptablesError) as exc:
            gate.close()
            delay.close()
            raise InjectorError(ErrorReason.APPLY_FAILED, str(exc)) from None
        return NfqueueLatencyHandle(
            rules=list(plan.rules),
            target=plan.ctx.target,
            installed=installed,
            comment=tagged[0].name,
            delay=delay,
            gate=gate,
            table=table.name,
        )

    def apply(self, fault: Fault, ctx: FaultContext) -> NfqueueLatencyHandle:
        return self.apply_plan(self.plan(fault, ctx))

    def revert(self, handle: Any) -> None:
        if not isinstance(handle, NfqueueLatencyHandle):
            raise TypeError(f"not an nfqueue-latency handle: {handle!r}")
        if handle.reverted:
            return
        error: str | None = None
        try:
            iptables.remove(handle.target, handle.installed)
        except iptables.IptablesError as exc:
            # Perhaps the watchdog removed them at the deadline: only leftovers are a failure.
            error = self._remove_leftovers(handle, str(exc))
        finally:
            with contextlib.suppress(NftError):
                handle.gate.run(f"delete table {GATE_FAMILY} {handle.table}\n")
            # The socket owns the table: closing it would remove the table anyway. Closing
            # takes the kernel 7-15 ms here, which the revert need not wait for.
            threading.Thread(target=handle.gate.close, name="nft-close", daemon=True).start()
            handle.delay.close()
        if error is not None:
            raise InjectorError(ErrorReason.REVERT_FAILED, error)
        handle.reverted = True

    @staticmethod
    def _remove_leftovers(handle: NfqueueLatencyHandle, first_error: str) -> str | None:
        try:
            for binary in sorted({r.binary for r in handle.installed}):
                iptables.remove_tagged(handle.target, binary, handle.comment)
                if iptables.tagged(handle.target, binary, handle.comment):
                    return f"rules tagged {handle.comment} remain ({first_error})"
        except (iptables.IptablesError, OSError) as exc:
            return f"{first_error}; then {exc}"
        return None
