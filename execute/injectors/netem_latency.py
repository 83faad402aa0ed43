"""Latency through `tc netem` via pyroute2, for kernels that have sch_netem.

A prio root qdisc with depdrill's reserved handle (dd00:) goes on each of the namespace's
interfaces, but only where the root is the kernel's own (noqueue, or a default qdisc with
handle 0): depdrill never replaces or deletes a qdisc it did not create, and deleting its
own root gives the kernel's default back exactly. Band 4 holds a netem qdisc (dd04:); u32
filters send packets to the dependency there, port 53 excepted. The other bands keep the
default priomap, so all other traffic is untouched.

netem delays the send path: the round trip grows by the delay just as when replies wait,
and unlike a user-space queue on OUTPUT, netem orphans each packet from its socket, so TCP
small queues do not starve the flow.

Every call apply() makes comes from `tc_calls()`, a pure function; `rules()` shows those
same calls, and `message()` encodes one as the netlink message pyroute2 sends.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    refusal,
    scope_of,
)
from depdrill.execute.model import ErrorReason
from depdrill.generate.model import Fault, LatencyFault
from depdrill.netns import Target

PRIO_HANDLE = 0xDD000000  # dd00:
NETEM_HANDLE = 0xDD040000  # dd04:
DELAY_BAND = 0xDD000004  # dd00:4, the band that holds netem
NORMAL_BAND = 0xDD000001  # dd00:1
TC_H_ROOT = 0xFFFFFFFF
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
# The kernel's default priomap over three bands; band 4 only gets what a filter sends there.
PRIOMAP = [1, 2, 2, 2, 1, 2, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
NETEM_LIMIT = 100_000  # packets; netem's default of 1000 drops under a long delay
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}
HANDLES = (LatencyFault,)
_available: str | None = None
_probed = False
_probe_lock = threading.Lock()


@dataclass(frozen=True)
class TcCall:
    """One `IPRoute.tc()` call: tc(command, kind, index, **options)."""

    command: str
    kind: str | None
    interface: str
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        shown = ", ".join(f"{k}={_show(k, v)}" for k, v in self.options.items())
        kind = f"{self.kind!r}, " if self.kind else ""
        return f"tc({self.command!r}, {kind}index=<{self.interface}>, {shown})"


def _show(key: str, value: Any) -> str:
    if key in {"handle", "parent", "target"} and isinstance(value, int):
        return f"0x{value:08x}"
    if key == "protocol" and isinstance(value, int):
        return f"0x{value:04x}"
    return repr(value)


def tc_calls(devices: list[str], scope: Scope, delay_ms: int, jitter_ms: int) -> list[TcCall]:
    """Every tc() call apply() makes, in order (the qdisc, netem, then the filters)."""
    calls: list[TcCall] = []
    for device in devices:
        calls.append(
            TcCall(
                "add",
                "prio",
                device,
                {"handle": PRIO_HANDLE, "parent": TC_H_ROOT, "bands": 4, "priomap": PRIOMAP},
            )
        )
        netem: dict[str, Any] = {
            "parent": DELAY_BAND,
            "handle": NETEM_HANDLE,
            "delay": delay_ms * 1000,
            "limit": NETEM_LIMIT,
        }
        if jitter_ms:
            netem["jitter"] = jitter_ms * 1000
        calls.append(TcCall("add", "netem", device, netem))
        prio = 1
        for address in scope.addresses:
            for protocol in scope.protocols:
                if not scope.ports and not scope.dns:
                    # Port 53 stays out unless the test targets DNS: a first, higher filter.
                    calls.append(_filter(device, prio, address, protocol, DNS_PORT, NORMAL_BAND))
                    prio += 1
                for port in scope.ports or (None,):
                    calls.append(_filter(device, prio, address, protocol, port, DELAY_BAND))
                    prio += 1
    return calls


def _filter(
    device: str, prio: int, address: str, protocol: str, port: int | None, band: int
) -> TcCall:
    ip = ipaddress.ip_address(address)
    number = PROTOCOL_NUMBERS[protocol]
    if ip.version == 4:
        keys = [f"0x{int(ip):08x}/0xffffffff+16", f"0x{number:02x}/0xff+9"]
        # u32 offsets are fixed: this assumes no IP options (as `tc ... match ip dport` does).
        port_offset = 22
    else:
        raw = ip.packed
        keys = [
            f"0x{int.from_bytes(raw[i : i + 4], 'big'):08x}/0xffffffff+{24 + i}"
            for i in range(0, 16, 4)
        ]
        keys.append(f"0x{number:02x}/0xff+6")
        port_offset = 42  # no extension headers
    if port is not None:
        keys.append(f"0x{port:04x}/0xffff+{port_offset}")
    return TcCall(
        "add-filter",
        "u32",
        device,
        {
            "parent": PRIO_HANDLE,
            "prio": prio,
            "protocol": ETH_P_IP if ip.version == 4 else ETH_P_IPV6,
            "target": band,
            "keys": keys,
        },
    )


def message(call: TcCall, index: int) -> Any:
    """The tcmsg pyroute2 would send for `call` on interface `index`, encoded and decoded."""
    from pyroute2.iproute.linux import get_arguments_processor
    from pyroute2.netlink.rtnl.tcmsg import tcmsg

    query = dict(call.options, index=index)
    if call.kind is not None:
        query["kind"] = call.kind
    processor = get_arguments_processor("tc", call.command, query)
    msg = tcmsg()
    for name, *_ in msg.fields:
        msg[name] = processor.get_value(name, default=0, mode="field")
    for key, value in processor.items():
        nla = tcmsg.name2nla(key)
        if msg.valid_nla(nla) and value is not None:
            msg["attrs"].append([nla, value])
    if "attrs" in processor:
        msg["attrs"].extend(processor["attrs"])
    msg.encode()
    decoded = tcmsg(msg.data)
    decoded.decode()
    return decoded


def probe_netem() -> str | None:
    """Try a netem qdisc on a veth in a throwaway namespace; None if it works."""
    global _available, _probed
    with _probe_lock:
        if _probed:
            return _available
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        name = f"depdrill-probe-{os.getpid()}-{secrets.token_hex(2)}"
        try:
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"cannot create a namespace to try netem in: {exc}"
        try:
            with IPRoute(netns=name) as ipr:
                # A veth pair: some kernels (this one) have no dummy driver either.
                ipr.link("add", ifname="ddprobe0", kind="veth", peer="ddprobe1")
                index = ipr.link_lookup(ifname="ddprobe0")[0]
                try:
                    ipr.tc("add", "netem", index, handle=NETEM_HANDLE, delay=1000)
                    ipr.tc("del", index=index, handle=NETEM_HANDLE, parent=TC_H_ROOT)
                except NetlinkError as exc:
                    raise _NoQdisc("sch_netem", exc) from None
                # Then the very calls apply() makes, on a fault for a test address.
                probe = Scope(
                    ipv4=("198.19.255.254",), ipv6=(), ports=(), protocols=("tcp",), dns=False
                )
                for call in tc_calls(["ddprobe0"], probe, 1, 0):
                    try:
                        ipr.tc(call.command, call.kind, index, **call.options)
                    except NetlinkError as exc:
                        module = "cls_" if call.command == "add-filter" else "sch_"
                        raise _NoQdisc(f"{module}{call.kind}", exc) from None
            _available = None
        except _NoQdisc as exc:
            _available = str(exc)
        except (OSError, NetlinkError) as exc:
            _available = f"cannot try netem: {exc}"
        finally:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        _probed = True
        return _available


class _NoQdisc(Exception):
    def __init__(self, kind: str, error: Any) -> None:
        unknown = getattr(error, "code", None) == errno.ENOENT
        why = "the kernel does not know this kind" if unknown else str(error)
        super().__init__(
            f"no {kind} in this kernel ({os.uname().release}): adding it on a veth in a "
            f"throwaway namespace failed: {why} (errno {getattr(error, 'code', '?')})"
        )


@dataclass
class NetemLatencyHandle:
    rules: list[str]
    target: Target
    devices: list[str]
    reverted: bool = False

    def matched(self) -> int | None:
        """Packets netem has sent on so far, over all interfaces."""
        total = 0
        with _iproute(self.target) as ipr:
            for device in self.devices:
                for qdisc in ipr.get_qdiscs(index=ipr.link_lookup(ifname=device)[0]):
                    if qdisc["handle"] == NETEM_HANDLE:
                        stats = qdisc.get_attr("TCA_STATS2")
                        basic = stats.get_attr("TCA_STATS_BASIC") if stats else None
                        total += basic["packets"] if basic else 0
        return total


def _iproute(target: Target) -> Any:
    from pyroute2 import IPRoute

    return IPRoute(netns=str(target.path))


class NetemLatency:
    name: ClassVar[str] = "netem-latency"

    def available(self) -> str | None:
        return probe_netem()

    def preflight(self, fault: Fault, ctx: FaultContext) -> Refusal | None:
        refused = refusal(fault, ctx, HANDLES, self.available())
        if refused is not None:
            return refused
        foreign = self._foreign_roots(ctx.target, interfaces(ctx.target))
        if foreign:
            return Refusal(ErrorReason.PREFLIGHT_REFUSED, foreign)
        return None

    def plan(self, fault: Fault, ctx: FaultContext) -> Plan:
        check(fault, ctx, HANDLES)
        assert isinstance(fault, LatencyFault)
        devices = interfaces(ctx.target)
        calls = tc_calls(devices, scope_of(fault), fault.delay_ms, fault.jitter_ms)
        return Plan(
            injector=self.name,
            fault=fault,
            ctx=ctx,
            rules=[c.describe() for c in calls],
            objects=[KernelObject(kind="qdisc", name="dd00:", where=d) for d in devices],
        )

    def rules(self, fault: Fault, ctx: FaultContext) -> list[str]:
        return self.plan(fault, ctx).rules

    def apply_plan(self, plan: Plan) -> NetemLatencyHandle:
        from pyroute2.netlink.exceptions import NetlinkError

        fault = plan.fault
        assert isinstance(fault, LatencyFault)
        devices = [o.where for o in plan.objects]
        foreign = self._foreign_roots(plan.ctx.target, devices)
        if foreign:
            raise InjectorError(ErrorReason.PREFLIGHT_REFUSED, foreign)
        handle = NetemLatencyHandle(rules=list(plan.rules), target=plan.ctx.target, devices=devices)
        calls = tc_calls(devices, scope_of(fault), fault.delay_ms, fault.jitter_ms)
        try:
            with _iproute(plan.ctx.target) as ipr:
                for call in calls:
                    index = ipr.link_lookup(ifname=call.interface)[0]
                    ipr.tc(call.command, call.kind, index, **call.options)
        except NetlinkError as exc:
            self.revert(handle)
            raise InjectorError(ErrorReason.APPLY_FAILED, f"tc: {exc}") from None
        return handle

    def apply(self, fault: Fault, ctx: FaultContext) -> NetemLatencyHandle:
        return self.apply_plan(self.plan(fault, ctx))

    def revert(self, handle: Any) -> None:
        if not isinstance(handle, NetemLatencyHandle):
            raise TypeError(f"not a netem-latency handle: {handle!r}")
        if handle.reverted:
            return
        remove_qdiscs(handle.target, handle.devices)
        handle.reverted = True

    @staticmethod
    def _foreign_roots(target: Target, devices: list[str]) -> str | None:
        """Why depdrill must not put its root qdisc on one of `devices`, or None."""
        with _iproute(target) as ipr:
            for device in devices:
                index = ipr.link_lookup(ifname=device)[0]
                for qdisc in ipr.get_qdiscs(index=index):
                    if qdisc["parent"] != TC_H_ROOT:
                        continue
                    kind = qdisc.get_attr("TCA_KIND")
                    if qdisc["handle"] in (0, PRIO_HANDLE) or kind == "noqueue":
                        continue
                    major = qdisc["handle"] >> 16
                    return (
                        f"{device} has a root qdisc {kind} {major:x}: that depdrill did not "
                        "create; it never replaces one"
                    )
        return None


def remove_qdiscs(target: Target, devices: list[str]) -> list[str]:
    """Delete depdrill's root qdisc (dd00:) where it still is; the kernel restores its default."""
    from pyroute2.netlink.exceptions import NetlinkError

    removed = []
    with _iproute(target) as ipr:
        for device in devices:
            found = ipr.link_lookup(ifname=device)
            if not found:
                continue
            for qdisc in ipr.get_qdiscs(index=found[0]):
                if qdisc["parent"] == TC_H_ROOT and qdisc["handle"] == PRIO_HANDLE:
                    try:
                        ipr.tc("del", index=found[0], handle=PRIO_HANDLE, parent=TC_H_ROOT)
                    except NetlinkError as exc:
                        raise InjectorError(
                            ErrorReason.REVERT_FAILED, f"tc del dd00: on {device}: {exc}"
                        ) from None
                    removed.append(f"qdisc dd00: on {device} in {target.describe()}")
    return removed
