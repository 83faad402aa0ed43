"""Proof that a fault bites: measured from inside the target's namespace, before and after.

A blackhole must make the dependency time out (a local error such as EPERM means the drop
is not silent, and does not count); a latency fault must slow a TCP handshake with the
dependency by at least PROOF_LATENCY_SHARE of the delay (less any jitter); a DNS
blackhole must make the resolver time out. For UDP-only faults, where nothing answers, the
fault's rule counter must rise after a datagram is sent. A control endpoint the fault does
not cover must still answer at its normal speed. Every measurement runs in a thread that
entered the namespace.
"""

from __future__ import annotations

import socket
import statistics
import struct
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import dns.exception
import dns.message
import dns.query

from depdrill.execute.injectors.base import Handle
from depdrill.execute.model import Check, Proof
from depdrill.execute.probes.base import describe_os_error
from depdrill.generate.model import DnsBlackholeFault, Fault, LatencyFault
from depdrill.netns import Target, entered

PROOF_TIMEOUT_S = 1.0
PROOF_LATENCY_SHARE = 0.8
CONTROL_SLACK_MS = 100.0
MAX_ADDRESSES = 4  # a dependency with many addresses: proving a few is proof enough
REFERENCE_CONNECTS = 3
COUNTER_SETTLE_S = 0.05
EXPOSURE_DRAIN_MARGIN_S = 0.25

EndpointKind = Literal["tcp", "udp", "dns"]


@dataclass(frozen=True)
class Endpoint:
    kind: EndpointKind
    address: str
    port: int

    def describe(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        verb = {"tcp": "tcp connect", "udp": "udp send", "dns": "dns query"}[self.kind]
        return f"{verb} {host}:{self.port}"


@dataclass(frozen=True)
class Outcome:
    result: str  # connected, refused, answered, sent, timeout, or an errno description
    elapsed_ms: float

    @property
    def reached(self) -> bool:
        """The endpoint answered (a refusal is an answer: the host is there)."""
        return self.result in {"connected", "refused", "answered"}


def measure(endpoint: Endpoint, timeout_s: float) -> Outcome:
    """One measurement from the calling thread's namespace."""
    family = socket.AF_INET6 if ":" in endpoint.address else socket.AF_INET
    kind = socket.SOCK_STREAM if endpoint.kind == "tcp" else socket.SOCK_DGRAM
    start = time.monotonic()

    def took() -> float:
        return (time.monotonic() - start) * 1000

    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout_s)
        try:
            if endpoint.kind == "tcp":
                sock.connect((endpoint.address, endpoint.port))
                elapsed = took()
                # End with a reset: no FIN exchange left to trickle through a delay after
                # the proof, where it would read as the service's own traffic (Exposure).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return Outcome("connected", elapsed)
            if endpoint.kind == "udp":
                sock.sendto(b"depdrill fault proof", (endpoint.address, endpoint.port))
                return Outcome("sent", took())
            query = dns.message.make_query(".", "NS")
            sock.setblocking(False)  # dnspython's contract for a socket handed to it
            dns.query.udp(query, endpoint.address, timeout_s, endpoint.port, sock=sock)
            return Outcome("answered", took())
        except ConnectionRefusedError:
            return Outcome("refused", took())
        except (TimeoutError, dns.exception.Timeout):
            return Outcome("timeout", took())
        except OSError as exc:
            return Outcome(describe_os_error(exc), took())
        except dns.exception.DNSException:
            return Outcome("answered", took())  # a malformed answer is still an answer


def measure_in(target: Target, endpoints: Sequence[Endpoint], timeout_s: float) -> list[Outcome]:
    """Measure endpoints concurrently, each from a thread inside the target's namespace."""

    def one(endpoint: Endpoint) -> Outcome:
        with entered(target):
            return measure(endpoint, timeout_s)

    if not endpoints:
        return []
    with ThreadPoolExecutor(max_workers=len(endpoints)) as pool:
        return list(pool.map(one, endpoints))


def fault_endpoints(fault: Fault) -> list[Endpoint]:
    """What to measure to see this fault: TCP where the fault covers it, else UDP."""
    if isinstance(fault, DnsBlackholeFault):
        return [Endpoint("dns", a, 53) for a in fault.resolvers[:MAX_ADDRESSES]]
    port = fault.ports[0] if fault.ports else 443  # no ports: every port is covered
    kind: EndpointKind = "tcp" if "tcp" in fault.protocols else "udp"
    return [Endpoint(kind, a, port) for a in fault.addresses[:MAX_ADDRESSES]]


def covers(fault: Fault, endpoint: Endpoint) -> bool:
    """Whether the fault's rules would catch traffic to this endpoint."""
    if isinstance(fault, DnsBlackholeFault):
        return endpoint.address in fault.resolvers and endpoint.port == 53
    proto = "udp" if endpoint.kind in {"udp", "dns"} else "tcp"
    return (
        endpoint.address in fault.addresses
        and proto in fault.protocols
        and (not fault.ports or endpoint.port in fault.ports)
    )


class FaultProof:
    """Call before() ahead of apply, verify(handle) after it."""

    def __init__(
        self,
        target: Target,
        fault: Fault,
        controls: Sequence[Endpoint],
        timeout_s: float = PROOF_TIMEOUT_S,
    ) -> None:
        self.target = target
        self.fault = fault
        self.timeout_s = timeout_s
        self.endpoints = fault_endpoints(fault)
        self.candidates = [c for c in controls if not covers(fault, c)]
        self._reference: list[Outcome] = []
        self._control: tuple[Endpoint, Outcome] | None = None

    @property
    def counts_packets(self) -> bool:
        return all(e.kind == "udp" for e in self.endpoints)

    def before(self) -> None:
        """Reference measurements while the fault is not on yet."""
        if self.counts_packets:
            self._reference = []
        elif isinstance(self.fault, LatencyFault):
            rounds = [
                measure_in(self.target, self.endpoints, self.timeout_s)
                for _ in range(REFERENCE_CONNECTS)
            ]
            self._reference = [
                Outcome(col[0].result, statistics.median(o.elapsed_ms for o in col))
                for col in zip(*rounds, strict=True)
            ]
        else:
            self._reference = measure_in(self.target, self.endpoints, self.timeout_s)
        # The first candidate that answers now is the control; a dead one proves nothing.
        for candidate in self.candidates:
            (outcome,) = measure_in(self.target, [candidate], self.timeout_s)
            if outcome.reached:
                self._control = (candidate, outcome)
                break

    def verify(self, handle: Handle) -> Proof:
        if self.counts_packets:
            checks = self._counter_checks(handle)
        elif isinstance(self.fault, LatencyFault):
            checks = self._latency_checks(self.fault)
        else:
            checks = self._timeout_checks()
        controls = self._control_checks()
        effective = bool(checks) and all(c.ok for c in checks) and all(c.ok for c in controls)
        return Proof(effective=effective, target=checks, control=controls)

    def _timeout_checks(self) -> list[Check]:
        after = measure_in(self.target, self.endpoints, self.timeout_s)
        checks = []
        for endpoint, was, now in zip(self.endpoints, self._reference, after, strict=True):
            if not was.reached:
                observed, ok = f"already unreachable before the fault ({was.result})", False
            elif now.result == "timeout":
                observed, ok = f"timeout after {now.elapsed_ms:.0f} ms (before: {was.result})", True
            else:
                observed, ok = f"{now.result} in {now.elapsed_ms:.0f} ms: not a silent drop", False
            checks.append(
                Check(
                    what=endpoint.describe(),
                    expected="timeout",
                    observed=observed,
                    ok=ok,
                    elapsed_ms=round(now.elapsed_ms, 3),
                )
            )
        return checks

    def _latency_checks(self, fault: LatencyFault) -> list[Check]:
        wait_s = 2 * (fault.delay_ms + fault.jitter_ms) / 1000 + self.timeout_s
        after = measure_in(self.target, self.endpoints, wait_s)
        # Jitter may take up to jitter_ms off one packet's delay: do not count on that part.
        need = max(1.0, PROOF_LATENCY_SHARE * (fault.delay_ms - fault.jitter_ms))
        checks = []
        for endpoint, was, now in zip(self.endpoints, self._reference, after, strict=True):
            added = now.elapsed_ms - was.elapsed_ms
            if not was.reached or not now.reached:
                observed, ok = f"{was.result} before, {now.result} after the fault", False
            else:
                ok = added >= need
                observed = (
                    f"{now.result} in {now.elapsed_ms:.1f} ms vs {was.elapsed_ms:.1f} ms before "
                    f"(+{added:.1f} ms)"
                )
            checks.append(
                Check(
                    what=endpoint.describe(),
                    expected=f"slower by >= {need:.0f} ms",
                    observed=observed,
                    ok=ok,
                    elapsed_ms=round(now.elapsed_ms, 3),
                )
            )
        return checks

    def _counter_checks(self, handle: Handle) -> list[Check]:
        first = handle.matched()
        sent = measure_in(self.target, self.endpoints, self.timeout_s)
        time.sleep(COUNTER_SETTLE_S)
        last = handle.matched()
        checks = []
        for endpoint, outcome in zip(self.endpoints, sent, strict=True):
            expected = "sent without a local error; rule counter rises"
            if outcome.result != "sent":
                observed, ok = f"send failed: {outcome.result}: not a silent drop", False
            elif first is None or last is None:
                observed, ok = "sent; the kernel gives no rule counter to confirm", False
            else:
                ok = last > first
                observed = f"sent; rule counter {first} -> {last}"
            checks.append(
                Check(
                    what=endpoint.describe(),
                    expected=expected,
                    observed=observed,
                    ok=ok,
                    elapsed_ms=round(outcome.elapsed_ms, 3),
                )
            )
        return checks

    def _control_checks(self) -> list[Check]:
        if self._control is None:
            return []
        endpoint, was = self._control
        (now,) = measure_in(self.target, [endpoint], self.timeout_s)
        limit = was.elapsed_ms + CONTROL_SLACK_MS
        ok = now.reached and now.elapsed_ms <= limit
        return [
            Check(
                what=endpoint.describe(),
                expected=f"answers within {limit:.0f} ms",
                observed=f"{now.result} in {now.elapsed_ms:.1f} ms",
                ok=ok,
                elapsed_ms=round(now.elapsed_ms, 3),
            )
        ]


def drain_s(fault: Fault) -> float:
    """How long the proof's own packets may still meet the fault after verify() returns.

    Proof connections end with a reset, but a latency proof's SYN may have been sent twice
    (the delay outlasting the first retransmission timeout), and the second SYN-ACK is still
    in the delay when verify() returns; a blackhole's or a DNS proof's sockets are gone at once.
    """
    if isinstance(fault, LatencyFault):
        return (fault.delay_ms + fault.jitter_ms) / 1000 + EXPOSURE_DRAIN_MARGIN_S
    return 0.0


class Exposure:
    """When the service's own traffic first met the fault: its packet counter rising.

    Counting starts once the proof's packets have drained, so only the service's traffic
    moves it. `at` is in sample time (seconds since `epoch`), None until seen.
    """

    def __init__(self, handle: Handle, fault: Fault, epoch: float) -> None:
        self.handle = handle
        self.epoch = epoch
        self.watch_from = time.monotonic() + drain_s(fault)
        self.base: int | None = None
        self.last: int | None = None
        self.at: float | None = None
        self.uncounted = False  # the kernel gave no counter

    def poll(self) -> float | None:
        """Reads the counter (once the proof has drained); returns `at`."""
        if time.monotonic() < self.watch_from:
            return self.at
        count = self.handle.matched()
        if count is None:
            self.uncounted = True
            return self.at
        if self.base is None:
            self.base = count
        elif count > self.base and self.at is None:
            self.at = round(time.monotonic() - self.epoch, 4)
        self.last = count
        return self.at

    def describe(self) -> str:
        """One clause for the verdict's rule."""
        if self.uncounted:
            return "the kernel gave no packet counter for the fault"
        if self.base is None or self.last is None:
            return "the observation ended before the service's own packets could be counted"
        if self.last == self.base:
            return "the service sent nothing into the fault while it was observed"
        return f"the fault caught {self.last - self.base} of the service's packets"
