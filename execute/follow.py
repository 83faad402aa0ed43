"""Follow a dependency while its fault is on: addresses the service newly resolves it to
join the fault, so a dependency that moves (or has many addresses) stays caught.

A packet socket in the target's namespace (discover's capture, DNS only by its kernel
filter) reads the answers the service receives; answers for the dependency's name, through
any CNAME chain, feed the fault handle's add_addresses(). Every answer is attacker-chosen
text: it is parsed by dnspython, and an address on the probe's path is refused by the handle.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Protocol, runtime_checkable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype

from depdrill.discover.capture import LiveCapture
from depdrill.errors import DepdrillError
from depdrill.execute.injectors.base import InjectorError
from depdrill.netns import Target

DNS_PORT = 53
FOREVER_S = 7 * 24 * 3600.0  # the capture runs until stopped
MAX_ERRORS = 20  # keep the first few, a flood of refusals must not grow without bound


@runtime_checkable
class FollowsAddresses(Protocol):
    def add_addresses(self, addresses: Iterable[str]) -> list[str]: ...


def addresses_for(wire: bytes, name: dns.name.Name) -> set[str]:
    """A and AAAA addresses a DNS response gives for `name`, following CNAMEs."""
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return set()
    if not message.flags & dns.flags.QR:
        return set()
    return addresses_in(message, name)


def addresses_in(message: dns.message.Message, name: dns.name.Name) -> set[str]:
    """A and AAAA addresses a parsed response gives for `name`, following CNAMEs."""
    names = {name}
    found: set[str] = set()
    # CNAMEs may come in any order: repeat until the chain stops growing.
    for _ in range(len(message.answer) + 1):
        before = len(names)
        for rrset in message.answer:
            if rrset.name not in names:
                continue
            if rrset.rdtype == dns.rdatatype.CNAME:
                names.update(r.target for r in rrset)
            elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                found.update(r.address for r in rrset)
        if len(names) == before:
            break
    return found


class AddressFollower:
    """Runs in a thread from enter to exit; `added` lists what joined the fault."""

    def __init__(self, target: Target, dependency: str, handle: FollowsAddresses) -> None:
        self.target = target
        self.handle = handle
        try:
            self.name = dns.name.from_text(dependency)
        except dns.exception.DNSException:
            self.name = dns.name.empty
        self.added: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="depdrill-follow", daemon=True)

    def __enter__(self) -> AddressFollower:
        self._thread.start()
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the capture is open (or failed to open: see `errors`)."""
        return self._ready.wait(timeout_s)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        try:
            # The packet socket, never nflog: ending an nflog capture unregisters netfilter
            # hooks, and the kernel then drops what a latency fault's queue holds.
            capture = LiveCapture.open(self.target)
        except (DepdrillError, OSError) as exc:
            self._note(f"cannot follow {self.name}: {exc}")
            self._ready.set()
            return
        self._ready.set()
        with capture:
            for _, segment in capture.packets(FOREVER_S, self._stop):
                if segment is None or segment.proto != "udp" or segment.sport != DNS_PORT:
                    continue
                fresh = addresses_for(segment.payload, self.name)
                if fresh:
                    self._add(fresh)

    def _add(self, addresses: set[str]) -> None:
        try:
            self.added += self.handle.add_addresses(sorted(addresses))
        except InjectorError as exc:
            self._note(exc.message)

    def _note(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)
