"""Blackhole a dependency: a silent drop, both directions, in an owner-flagged nft table.

Silent as a dead host is: packets to the dependency are dropped on the netdev egress hook
of the namespace's interfaces (after the stack has accepted them, so a UDP sendto succeeds
and a TCP connect times out), and packets from it on the netdev ingress hook. An inet
output drop would return EPERM to UDP senders at once, and a blackhole route EINVAL: both
tell the service something a dead host never would.

The table is created with the owner flag from a libnftables context this process keeps
open for the fault's life: if the process dies, even by SIGKILL, the kernel removes the
table. The addresses sit in sets whose elements time out at the fault's deadline, a second
expiry that needs no process at all.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Iterable
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
from depdrill.execute.injectors.scope import (
    DNS_PORT,
    Scope,
    check,
    interfaces,
    milliseconds_until,
    next_serial,
    refusal,
    scope_of,
)
from depdrill.execute.model import ErrorReason
from depdrill.generate.model import BlackholeFault, DnsBlackholeFault, Fault
from depdrill.libnftables import NftContext, NftError, library
from depdrill.netns import entered

FAMILY = "netdev"
_COUNTER = re.compile(r"\bcounter packets (\d+) bytes \d+")
# Before anything else on the hook (conntrack, other filters): the packet is gone unseen.
PRIORITY = -500
SET4, SET6 = "dependency4", "dependency6"
HANDLES = (BlackholeFault, DnsBlackholeFault)


def table_name(run_id: str, serial: int) -> str:
    return f"depdrill_{run_id}_{serial}"


def ruleset(table: str, devices: Iterable[str], scope: Scope, timeout_ms: int) -> str:
    """The whole table as `nft -f` reads it: what apply() loads and --dry-run prints."""
    device_list = ", ".join(f'"{d}"' for d in devices)
    lines = [f"table {FAMILY} {table} {{", "\tflags owner;"]
    for name, kind, members in ((SET4, "ipv4_addr", scope.ipv4), (SET6, "ipv6_addr", scope.ipv6)):
        lines += [f"\tset {name} {{", f"\t\ttype {kind}; flags timeout;"]
        if members:
            elements = ", ".join(f"{a} timeout {timeout_ms}ms" for a in members)
            lines.append(f"\t\telements = {{ {elements} }}")
        lines.append("\t}")
    for chain, hook, addr, port in (
        ("to_dependency", "egress", "daddr", "dport"),
        ("from_dependency", "ingress", "saddr", "sport"),
    ):
        lines += [
            f"\tchain {chain} {{",
            f"\t\ttype filter hook {hook} devices = {{ {device_list} }} priority {PRIORITY};"
            " policy accept;",
        ]
        match = _transport_match(scope, port)
        lines.append(f"\t\tip {addr} @{SET4} {match}counter drop")
        lines.append(f"\t\tip6 {addr} @{SET6} {match}counter drop")
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _transport_match(scope: Scope, port: str) -> str:
    protocols = ", ".join(scope.protocols)
    match = f"meta l4proto {{ {protocols} }} "
    if scope.ports:
        match += f"th {port} {{ {', '.join(str(p) for p in scope.ports)} }} "
    elif not scope.dns:
        match += f"th {port} != {DNS_PORT} "
    return match


@dataclass
class NftBlackholeHandle:
    """An applied blackhole: the owning libnftables context and what it installed."""

    table: str
    ctx: FaultContext
    rules: list[str]
    nft: NftContext
    addresses: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def matched(self) -> int | None:
        """Packets dropped so far, both directions."""
        try:
            with self._lock:  # one libnftables context, shared with the address follower
                listing = self.nft.run(f"list table {FAMILY} {self.table}\n")
        except NftError:
            return None
        return counted(listing)

    def add_addresses(self, addresses: Iterable[str]) -> list[str]:
        """Add addresses the service newly resolved for the dependency; returns those added."""
        protected = set(self.ctx.protected)
        with self._lock:
            fresh = sorted({str(ipaddress.ip_address(a)) for a in addresses} - self.addresses)
            caught = [a for a in fresh if a in protected]
            if caught:
                raise InjectorError(
                    ErrorReason.PREFLIGHT_REFUSED,
                    f"not adding {', '.join(caught)}: on the probe's path or depdrill's own",
                )
            if not fresh:
                return []
            timeout_ms = milliseconds_until(self.ctx.deadline)
            commands = "".join(
                f"add element {FAMILY} {self.table} {SET6 if ':' in a else SET4} "
                f"{{ {a} timeout {timeout_ms}ms }}\n"
                for a in fresh
            )
            try:
                self.nft.run(commands)
            except NftError as exc:
                raise InjectorError(ErrorReason.APPLY_FAILED, f"nft: {exc}") from None
            self.addresses.update(fresh)
            self.rules.append(commands.rstrip("\n"))
            return fresh


def counted(listing: str) -> int:
    """Packets the counters of a table's text listing saw. Text, not JSON: libnftables 1.0.6
    sometimes ends its JSON for an owner table at `"flags": ` (seen in CI), while its text
    listing stays whole."""
    return sum(int(n) for n in _COUNTER.findall(listing))


class NftBlackhole:
    name: ClassVar[str] = "nft-blackhole"

    def available(self) -> str | None:
        try:
            library()
        except DepdrillError as exc:
            return str(exc)
        return None

    def preflight(self, fault: Fault, ctx: FaultContext) -> Refusal | None:
        return refusal(fault, ctx, HANDLES, self.available())

    def plan(self, fault: Fault, ctx: FaultContext) -> Plan:
        check(fault, ctx, HANDLES)
        table = table_name(ctx.run_id, next_serial())
        text = ruleset(
            table, interfaces(ctx.target), scope_of(fault), milliseconds_until(ctx.deadline)
        )
        return Plan(
            injector=self.name,
            fault=fault,
            ctx=ctx,
            rules=[text],
            objects=[KernelObject(kind="nft-table", name=table, where=FAMILY)],
        )

    def rules(self, fault: Fault, ctx: FaultContext) -> list[str]:
        return self.plan(fault, ctx).rules

    def apply_plan(self, plan: Plan) -> NftBlackholeHandle:
        table = plan.objects[0].name
        # The socket must be born inside the target namespace: it acts there, and it owns.
        with entered(plan.ctx.target):
            nft = NftContext()
        try:
            nft.run(plan.rules[0])
        except NftError as exc:
            nft.close()
            raise InjectorError(ErrorReason.APPLY_FAILED, f"nft: {exc}") from None
        return NftBlackholeHandle(
            table=table,
            ctx=plan.ctx,
            rules=list(plan.rules),
            nft=nft,
            addresses=set(scope_of(plan.fault).addresses),
        )

    def apply(self, fault: Fault, ctx: FaultContext) -> NftBlackholeHandle:
        return self.apply_plan(self.plan(fault, ctx))

    def revert(self, handle: Any) -> None:
        if not isinstance(handle, NftBlackholeHandle):
            raise TypeError(f"not an nft-blackhole handle: {handle!r}")
        if handle.nft.closed:
            return
        try:
            handle.nft.run(f"delete table {FAMILY} {handle.table}\n")
        except NftError as exc:
            # The table is owned by this socket: closing it removes the table in any case.
            handle.nft.close()
            # Already gone (its namespace was deleted): closing the context was all that was left.
            if "No such file or directory" not in str(exc):
                raise InjectorError(ErrorReason.REVERT_FAILED, f"nft: {exc}") from None
            return
        # The fault is gone; closing a netlink socket takes the kernel 7-15 ms here (an RCU
        # grace period), which nobody needs to wait for.
        threading.Thread(target=handle.nft.close, name="nft-close", daemon=True).start()
