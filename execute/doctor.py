"""`depdrill doctor`: what this machine can do, each answer from a real try, and why not.

Every check that touches the kernel runs in a throwaway network namespace (with a dummy
veth pair) that is deleted afterwards, so the doctor never changes the host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from depdrill.errors import DepdrillError
from depdrill.netns import Target, entered

CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
PROBE_IFNAME = "ddprobe0"
PROBE_QUEUE = 0xDDFF
DLT_EN10MB = 1  # Ethernet framing, for compiling a BPF filter without an interface


@dataclass(frozen=True)
class Capability:
    name: str
    ok: bool
    detail: str
    optional: bool = False  # the tool works without it (another path, or the lab only)


class _Missing(Exception):
    """A check found the capability missing; the message says why."""


def doctor() -> list[Capability]:
    """Run every check; a check that cannot even start reports why, never raises."""
    results = [_check("root (CAP_NET_ADMIN, CAP_SYS_ADMIN)", _capabilities)]
    if not results[0].ok:
        return results + [
            Capability(name, False, "needs root", optional)
            for name, _, optional in _NAMESPACE_CHECKS
        ]
    try:
        with _throwaway_namespace() as target:
            for name, check, optional in _NAMESPACE_CHECKS:
                results.append(_check(name, lambda c=check: c(target), optional))  # type: ignore[misc]
    except (OSError, subprocess.CalledProcessError, DepdrillError) as exc:
        results.append(Capability("throwaway namespace", False, str(exc)))
    results.append(_check("sch_netem (tc netem latency)", _netem, optional=True))
    results.append(_check("scapy + libpcap BPF filters (the packet tap)", _bpf))
    for server in ("dnsmasq", "redis-server"):
        results.append(_check(f"{server} (for the lab)", lambda s=server: _binary(s), True))  # type: ignore[misc]
    return results


def _check(name: str, run: Callable[[], str], optional: bool = False) -> Capability:
    try:
        return Capability(name, True, run(), optional)
    except _Missing as exc:
        return Capability(name, False, str(exc), optional)
    except Exception as exc:  # a doctor reports every failure, whatever raised it
        return Capability(name, False, f"{type(exc).__name__}: {exc}", optional)


def _capabilities() -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            missing = [
                n
                for n, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
                if not effective >> bit & 1
            ]
            if missing:
                raise _Missing(f"missing {', '.join(missing)}: run as root")
            return f"uid {os.geteuid()}, both capabilities effective"
    raise _Missing("cannot read capabilities from /proc/self/status")


@contextmanager
def _throwaway_namespace() -> Iterator[Target]:
    name = f"depdrill-doctor-{os.getpid()}-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        # A veth pair, not a dummy: some kernels (this one) lack the dummy driver.
        for argv in (
            ["link", "add", PROBE_IFNAME, "type", "veth", "peer", "name", "ddprobe1"],
            ["link", "set", PROBE_IFNAME, "up"],
        ):
            subprocess.run(["ip", "-n", name, *argv], check=True, capture_output=True)
        yield Target(netns=name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _setns(target: Target) -> str:
    with entered(target):
        inside = os.readlink(f"/proc/self/task/{threading.get_native_id()}/ns/net")
    if inside == os.readlink("/proc/self/ns/net"):
        raise _Missing("setns(2) returned but the thread stayed in the host namespace")
    return "setns(2) into a namespace and back works (per thread)"


def _libnftables(target: Target) -> str:
    from depdrill.libnftables import LIBRARY, NftContext

    with entered(target):
        nft = NftContext()
    with nft:
        nft.run("add table inet depdrill_doctor\n")
        nft.run("delete table inet depdrill_doctor\n")
    return f"{LIBRARY} loaded; in-process tables added and deleted"


def _owner_tables(target: Target) -> str:
    from depdrill.libnftables import NftContext

    with entered(target):
        owner, other = NftContext(), NftContext()
    with other:
        with owner:
            owner.run("add table netdev depdrill_doctor_owner { flags owner; }\n")
        # The owner's socket is closed: the kernel must have removed the table with it.
        for _ in range(50):
            if "depdrill_doctor_owner" not in other.run("list tables\n"):
                return "a table with `flags owner` vanished when its socket closed"
            time.sleep(0.01)
    raise _Missing("the owner-flagged table outlived its socket: faults could outlive depdrill")


def _egress_hook(target: Target) -> str:
    from depdrill.libnftables import NftContext, NftError

    with entered(target):
        nft = NftContext()
    with nft:
        try:
            nft.run(
                "table netdev depdrill_doctor_egress {\n"
                f'\tchain c {{ type filter hook egress device "{PROBE_IFNAME}" priority 0; }}\n'
                "}\n"
            )
        except NftError as exc:
            raise _Missing(f"netdev egress hook refused (kernel >= 5.16 needed): {exc}") from None
        nft.run("delete table netdev depdrill_doctor_egress\n")
    return "netdev egress chains work: blackholes drop silently"


def _nfqueue_rule(target: Target) -> str:
    from depdrill.execute.injectors.nfqueue_latency import GATE_MARK
    from depdrill.execute.injectors.nftnl import NetlinkError, NftSocket, QueueRule

    with entered(target):
        sock = NftSocket()
    try:
        sock.add(QueueRule("ip", "depdrill_doctor_queue", "input", 0, GATE_MARK, PROBE_QUEUE))
    except NetlinkError as exc:
        raise _Missing(
            f"the NFQUEUE target through nft_compat was refused ({exc}): the kernel needs "
            "CONFIG_NFT_COMPAT and xt_NFQUEUE"
        ) from None
    finally:
        sock.close()
    return "an owner-flagged nf_tables rule with nft_compat's NFQUEUE target, bypass flag"


def _nfqueue_release(target: Target) -> str:
    from depdrill.execute.injectors.nfqueue_latency import DelayQueue

    queue = DelayQueue(target, PROBE_QUEUE, 0.001, 0.0)
    queue.close()
    return f"a release process ({queue.policy}) took a queue bound inside a namespace"


def _nflog_capture(target: Target) -> str:
    from depdrill.discover.nflog import NflogCapture, NflogUnavailable

    capture = _opened(
        lambda: NflogCapture.open(target),
        NflogUnavailable,
        "without eBPF, discovery captures with a packet socket",
    )
    return f"an owner nft table logged to NFLOG group {capture.group}, read over nfnetlink_log"


def _ebpf_capture(target: Target) -> str:
    from depdrill.bpf import BpfUnavailable
    from depdrill.discover.ebpf import EbpfCapture

    capture = _opened(
        lambda: EbpfCapture.open(target, fold=True),
        BpfUnavailable,
        "discovery captures through nflog instead",
    )
    return (
        f"tcx programs (repeated DNS exchanges counted in the kernel) loaded and attached to "
        f"{', '.join(capture.interfaces)}, then detached"
    )


class _Closes(Protocol):
    def close(self) -> None: ...


_Tap = TypeVar("_Tap", bound=_Closes)


def _opened(open_tap: Callable[[], _Tap], refused: type[Exception], instead: str) -> _Tap:
    """A capture tap opened for real and closed again; refused, what discovery does instead."""
    try:
        capture = open_tap()
    except refused as exc:
        raise _Missing(f"{exc}; {instead}") from None
    capture.close()
    return capture


def _netem() -> str:
    from depdrill.execute.injectors.netem_latency import probe_netem

    why = probe_netem()
    if why is not None:
        raise _Missing(f"{why}; latency uses the NFQUEUE path instead")
    return "a netem qdisc was added in a throwaway namespace"


def _bpf() -> str:
    try:
        from scapy.arch.common import compile_filter
    except ImportError as exc:
        raise _Missing(f"scapy is not importable: {exc}") from None
    try:
        compile_filter("udp port 53 or tcp[tcpflags] & tcp-syn != 0", linktype=DLT_EN10MB)
    except Exception as exc:  # scapy raises its own Scapy_Exception without libpcap
        raise _Missing(f"cannot compile a BPF filter (apt install libpcap0.8): {exc}") from None
    return "scapy compiled a BPF filter through libpcap"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise _Missing(f"{name} is not installed")
    return path


_NAMESPACE_CHECKS: list[tuple[str, Callable[[Target], str], bool]] = [
    ("setns (enter a namespace)", _setns, False),
    ("nftables (libnftables)", _libnftables, False),
    ("owner-flagged nft tables", _owner_tables, False),
    ("netdev egress hook", _egress_hook, False),
    ("NFQUEUE queue rule (nft_compat)", _nfqueue_rule, False),
    ("NFQUEUE release process", _nfqueue_release, False),
    ("eBPF capture (discovery's default tap)", _ebpf_capture, True),
    ("NFLOG capture (discovery's tap without eBPF)", _nflog_capture, True),
]
