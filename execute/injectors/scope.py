"""What a fault catches (addresses, ports, protocols) and the refusals every injector shares."""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import socket
import threading
from dataclasses import dataclass
from datetime import datetime

from depdrill.errors import CapabilityError, DepdrillError
from depdrill.execute.injectors.base import FaultContext, InjectorError, Refusal
from depdrill.execute.model import ErrorReason
from depdrill.generate.model import DnsBlackholeFault, Fault
from depdrill.netns import Target, entered, same_as_host

DNS_PORT = 53
_RUN_ID = re.compile(r"^[a-z0-9]{1,16}$")
# Interface names are chosen by whoever owns the namespace and end up inside rule text.
_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
_serial = itertools.count(1)
_serial_lock = threading.Lock()


def next_serial() -> int:
    """The <n> in depdrill_<run_id>_<n>: unique within this process."""
    with _serial_lock:
        return next(_serial)


@dataclass(frozen=True)
class Scope:
    """The packets a fault is about, as every injector reads them."""

    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]
    ports: tuple[int, ...]  # empty: every port but 53
    protocols: tuple[str, ...]
    dns: bool  # the fault targets resolvers: port 53 is the point, not excluded

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.ipv4 + self.ipv6


def scope_of(fault: Fault) -> Scope:
    addresses: list[str]
    ports: list[int]
    protocols: list[str]
    if isinstance(fault, DnsBlackholeFault):
        addresses, ports, protocols, dns = fault.resolvers, [DNS_PORT], ["tcp", "udp"], True
    else:
        addresses, ports, dns = fault.addresses, fault.ports, False
        protocols = list(fault.protocols)
    parsed = sorted({ipaddress.ip_address(a) for a in addresses}, key=lambda a: (a.version, a))
    return Scope(
        ipv4=tuple(str(a) for a in parsed if a.version == 4),
        ipv6=tuple(str(a) for a in parsed if a.version == 6),
        ports=tuple(sorted(set(ports))),
        protocols=tuple(sorted(set(protocols))),
        dns=dns,
    )


def refusal(
    fault: Fault, ctx: FaultContext, kinds: tuple[type, ...], unavailable: str | None = None
) -> Refusal | None:
    """The checks that keep a fault from catching more than its dependency; then, when the
    injector said why it cannot run here (`unavailable`), that."""
    if not isinstance(fault, kinds):
        return _refuse(f"{fault.kind} faults are not handled by this injector")
    if not _RUN_ID.match(ctx.run_id):
        return _refuse(f"run id {ctx.run_id!r} is not 1-16 characters of [a-z0-9]")
    scope = scope_of(fault)
    if not scope.addresses:
        return _refuse("the fault names no address: refusing to widen it to all traffic")
    if not scope.protocols:
        return _refuse("the fault names no protocol")
    caught = sorted(set(scope.addresses) & {_normal(a) for a in ctx.protected})
    if caught:
        return _refuse(
            f"the fault would catch {', '.join(caught)}, on the probe's path or depdrill's own"
        )
    if DNS_PORT in scope.ports and not scope.dns:
        return _refuse("port 53 is excluded unless the test targets DNS (a dns-blackhole test)")
    try:
        ctx.target.check()
        if same_as_host(ctx.target):
            return _refuse(
                f"{ctx.target.describe()} is depdrill's own network namespace: a fault there "
                "would catch the host's traffic"
            )
    except CapabilityError as exc:
        return Refusal(ErrorReason.MISSING_CAPABILITY, f"{exc} (see `depdrill doctor`)")
    except DepdrillError as exc:
        return Refusal(ErrorReason.PREFLIGHT_REFUSED, str(exc))
    if os.geteuid() != 0:
        return Refusal(
            ErrorReason.MISSING_CAPABILITY, "faults need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
        )
    if unavailable is not None:
        return Refusal(ErrorReason.MISSING_CAPABILITY, f"{unavailable} (see `depdrill doctor`)")
    return None


def check(fault: Fault, ctx: FaultContext, kinds: tuple[type, ...]) -> None:
    """Raise the refusal as an InjectorError (apply() re-checks what preflight() said)."""
    refused = refusal(fault, ctx, kinds)
    if refused is not None:
        raise InjectorError(refused.reason, refused.message)


def milliseconds_until(deadline: datetime) -> int:
    from depdrill.artifact import utcnow

    left = int((deadline - utcnow()).total_seconds() * 1000)
    if left <= 0:
        raise InjectorError(ErrorReason.APPLY_FAILED, "the fault's deadline has already passed")
    return left


def interfaces(target: Target) -> list[str]:
    """The namespace's interfaces other than loopback, checked to be safe in rule text."""
    found: list[str] = []
    with entered(target):
        names = [name for _, name in socket.if_nameindex()]
    for name in names:
        if name == "lo":
            continue
        if not _IFNAME.match(name):
            raise InjectorError(
                ErrorReason.PREFLIGHT_REFUSED, f"interface name {name!r} is not one depdrill uses"
            )
        found.append(name)
    if not found:
        raise InjectorError(
            ErrorReason.PREFLIGHT_REFUSED, f"{target.describe()} has no interface but loopback"
        )
    return found


def _normal(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _refuse(message: str) -> Refusal:
    return Refusal(ErrorReason.PREFLIGHT_REFUSED, message)
