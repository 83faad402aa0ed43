"""The service's own p99 latency while depdrill captures in its namespace, against without.

A tiny HTTP service in a throwaway namespace resolves a name through dnsmasq (in a second
namespace) for every request (or every Nth, `--lookup-every N`: a service that caches its
lookups), so each request puts two DNS messages and a SYN (the one the service accepts:
the filter keeps it in the kernel) in front of the capture. Every request resolving is the
hard case for the nflog tap: a packet it logs costs the service more than one the packet
socket copies (bench/tapcost.py, `dns`), while every other packet costs it less; the ebpf
tap (the default) costs less than both either way. The load is
open-loop at a fixed rate (RATE requests/s, a quarter of what the service can take here),
one connection per request, as a production host sees it: a request starts at its
scheduled time whatever the one before it did, and when the one before it ran past that
time its latency counts from the scheduled time (the wait a real client would have seen),
so a slow stretch cannot hide by slowing the load down. The wait is rebuilt from each
request's own time (see `load`), so the load generator's own stalls (sends up to 4 ms
late here; the version before this one counted the requests queued behind them, which
put its p99 in the milliseconds) do not count. The earliest version ran requests
back to back, closed-loop: the load loop, the service and dnsmasq then kept a core busy
between them, and on 2 cores any CPU the capture used at all showed up as latency, which
is not what a service that is not saturated sees.

The run is a series of cycles; each cycle runs its short rounds in a fresh random order:
`off` (no capture), `again` (no capture either: the calibration) and one per tap (`--taps`,
default all three): `ebpf`, `nflog` and `packet`, each a `depdrill.discover.run` with that
tap in its own process, as the CLI runs it, started before the round and ready before its
first request. Drift and other load on the box hit every arm alike. Every round begins
with a rest (SETTLE_S, after the capture is ready): the kernel frees a closed capture's
ring, maps and programs in deferred work for a while after it closes, and without the
rest that work landed in whatever round came next (in 100 cycles, a round after an ebpf
round had a median of 6 to 8 requests past the pooled p99, against 2 to 4 after the others).

The twin (`--no-twin` leaves it out) is a copy of the service in a namespace of its own,
never captured, loaded side by side with it (their requests interleaved). This VM's speed
drifts between slow and fast spells lasting seconds (round p50s from 120 to 210 µs), and
the twin lives through the same moments: beside it, per round, the service's p50 moves
with the twin's (correlation 0.9), its p99 far less (0.3 to 0.5: a tail is mostly stalls
of one process). `beside the twin` divides each ratio by the twin's: what is left is what
the capture did to the packets of the service it captured, without what it did to the
whole host (its CPU), which the plain ratios keep.

Printed: the pooled p50s and p99s (the twin's too), `again/off` (what the bench calls a
difference when there is none: its noise) next to each `<tap>/off`, each p99 ratio with a
95 % bootstrap interval (cycles resampled with replacement, so each resample keeps the
rounds that ran side by side together), and whether the target (a rise of at most 2 %)
is met: only when the whole interval is under 1.02; "not resolved" when the interval
straddles it. The verdict is on the plain ratio, which counts everything the capture
costs; then each arm's p50 and p99 ratios beside the twin, with their intervals.

By default every process floats over every CPU, as on a host. `--pin` is the harsh case
for a 2-core box: the load on one CPU, and the service, dnsmasq and the capture confined
to the other, so the capture's packet loop can only ever run on the service's own CPU.
`--taps ebpf,ebpf-copy` sets the ebpf tap against itself copying every DNS packet to
depdrill, as it did before it counted repeated exchanges in the kernel (discover/fold.py).
`--tap-only` opens each tap (programs and ring; rules and NFLOG group; or socket, filter
and ring) and never reads it: the kernel's share of the cost, apart from the packet
loop's (bench/tapcost.py prices it per packet).

Run as root, under the bench lock: `flock /tmp/depdrill-bench.lock .venv/bin/python -P
bench/overhead.py [--rate N] [--seconds S] [--cycles N] [--lookup-every N]
[--taps ebpf,nflog,packet] [--pin] [--tap-only] [--no-twin] [--settle S] [--save FILE]`;
`--save` writes every round's latencies, as sent, with the cycles' order, for a closer look.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from depdrill.testing import RUN, scratch_bridge

PORT = 8080
TARGET_RISE = 0.02
RATE = 2000
SETTLE_S = 0.3
TAPS = ("ebpf", "nflog", "packet")
# Not run by default: the ebpf tap copying every DNS packet to depdrill, as it did before
# it counted repeated exchanges in the kernel (DiscoverOptions.fold False).
VARIANTS = ("ebpf-copy",)

SERVICE = """
import socket, sys, os
resolver, every = sys.argv[1], int(sys.argv[2])
# api.bnch.test A, ID 0 (replaced per request)
query = bytes.fromhex("000001000001000000000000" "0361706904626e636804746573740000010001")
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.connect((resolver, 53)); dns.settimeout(2)
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 8080)); server.listen(128)
print("ready", flush=True)
n = 0
while True:
    conn, _ = server.accept()
    conn.recv(4096)
    n = (n + 1) & 0xFFFF
    if n % every == 0:
        dns.send(n.to_bytes(2, "big") + query[2:])
        dns.recv(512)
    conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    conn.close()
"""

# One process for the whole run (its start-up is not what is measured): each "start" line
# begins a discovery run (ready when it is filtering), each "stop" ends it and prints counts.
# Between runs it sleeps on stdin, its socket closed: the service runs as if it were absent.
CAPTURE = """
import resource, sys, threading
from depdrill.discover.run import DiscoverOptions, run
from depdrill.netns import Target
tap = sys.argv[2].removesuffix("-copy")  # ebpf-copy: ebpf copying every packet, no folds
options = DiscoverOptions(
    target=Target(netns=sys.argv[1]), duration_s=3600, tap=tap, fold=tap == sys.argv[2]
)
print("ready", flush=True)
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
for line in sys.stdin:
    stop, ready, graphs = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=lambda: graphs.append(run(options, stop, ready)))
    thread.start()
    ready.wait()
    print("capturing", flush=True)
    used = cpu()
    sys.stdin.readline()
    used = cpu() - used  # the round's share: the graph is built after it
    stop.set()
    thread.join()
    capture = graphs[0].capture
    assert capture.tap == tap, capture.tap_fallback
    counts = capture.dns_messages, capture.kernel_drops, ",".join(capture.interfaces), used
    print(*counts, flush=True)
"""

# --tap-only: the same tap (socket, filter and ring; or rules and group), never read: the
# kernel's share of the cost.
TAP_ONLY = """
import sys
from depdrill.discover.run import open_tap
from depdrill.netns import Target
print("ready", flush=True)
for line in sys.stdin:
    tap = sys.argv[2].removesuffix("-copy")
    capture, _ = open_tap(Target(netns=sys.argv[1]), tap, fold=tap == sys.argv[2])
    print("capturing", flush=True)
    sys.stdin.readline()
    capture.close()
    print(0, capture.kernel_drops, ",".join(capture.interfaces), 0, flush=True)
"""


@dataclass
class World:
    service: str  # the namespace captured
    addresses: list[str]  # the service's, and its twin's when there is one


def _start(argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **kwargs)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        raise RuntimeError(f"{argv[:5]} did not start: {line!r}")
    return proc


@contextmanager
def world(pin: list[str], lookup_every: int = 1, twin: bool = False) -> Iterator[World]:
    """The service (.10), with `twin` a copy of it (.11), and dnsmasq (.53) on a bridge
    whose host side is .1; `pin`: taskset."""
    procs: list[subprocess.Popen[str]] = []
    with scratch_bridge(0, f"ddto{RUN}") as net:
        try:
            dns = net.add("dns", 53)
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", dns, *pin, "dnsmasq", "--keep-in-foreground",
                     "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces",
                     f"--listen-address={net.address(53)}", "--local=/test/", "--pid-file=",
                     "--log-facility=/dev/null", f"--host-record=api.bnch.test,{net.address(20)}"],
                    text=True,
                )
            )  # fmt: skip
            time.sleep(0.3)
            service_argv = [sys.executable, "-c", SERVICE, net.address(53), str(lookup_every)]
            copies = [(net.add(f"svc{n}", 10 + n), net.address(10 + n)) for n in range(1 + twin)]
            for namespace, _ in copies:
                procs.append(_start(["ip", "netns", "exec", namespace, *pin, *service_argv]))
            yield World(copies[0][0], [address for _, address in copies])
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()


def load(address: str, rate: int, seconds: float) -> list[float]:
    """Requests to one service at `rate`/s for `seconds`: `load_side_by_side` of one."""
    return load_side_by_side([address], rate, seconds)[0]


def load_side_by_side(addresses: list[str], rate: int, seconds: float) -> list[list[float]]:
    """Requests at `rate`/s to each address for `seconds`, one connection each, the
    services' turns interleaved evenly; each one's latencies in µs.

    A request's latency is what an ideal open-loop client would have seen: it arrives when
    due, waits while the (single-threaded) service finishes the ones before it, then takes
    the time the service really took for it. Each request is timed from its own send, and
    the queue is rebuilt from those times (the Lindley recursion), so a slow request makes
    the next ones wait as it would in production, while a stall of this Python loop itself
    (it is not the service: seen here as sends that left up to 4 ms late) adds nothing.
    """
    interval_ns = 10**9 // rate
    turn_ns = interval_ns // len(addresses)
    taken: list[list[int]] = [[] for _ in addresses]
    start = time.perf_counter_ns() + 1_000_000
    for i in range(int(rate * seconds)):
        for k, address in enumerate(addresses):
            due = start + i * interval_ns + k * turn_ns
            while (wait := due - time.perf_counter_ns()) > 0:
                time.sleep(wait / 1e9)
            began = time.perf_counter_ns()
            with socket.create_connection((address, PORT), timeout=5) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                while conn.recv(4096):
                    pass
            taken[k].append(time.perf_counter_ns() - began)
    return [_queued(one, interval_ns) for one in taken]


def _queued(taken: list[int], interval_ns: int) -> list[float]:
    """Latencies (µs) of requests due every `interval_ns` that each took `taken` ns."""
    latencies = []
    free_at = 0  # when the service finished the request before this one
    for i, service_ns in enumerate(taken):
        due = i * interval_ns
        free_at = max(due, free_at) + service_ns
        latencies.append((free_at - due) / 1000)
    return latencies


def quantile(ordered: list[float], q: float) -> float:
    """The nearest-rank quantile of ascending values (the one the bootstrap can compute fast)."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Arm:
    """One arm's rounds in cycle order (round i ran in cycle i), each kept sorted: the
    service's, and its twin's at the same moments."""

    rounds: list[list[float]] = field(default_factory=list)
    twin: list[list[float]] = field(default_factory=list)
    raw: list[list[list[float]]] = field(default_factory=list)  # as sent, for --save

    def record(self, latencies: list[list[float]]) -> None:
        self.rounds.append(sorted(latencies[0]))
        if len(latencies) > 1:
            self.twin.append(sorted(latencies[1]))
        self.raw.append(latencies)

    def pooled(self, q: float, twin: bool = False) -> float:
        return quantile(sorted(v for r in (self.twin if twin else self.rounds) for v in r), q)


def tail_ratio(num: Arm, den: Arm, cycles: list[int], q: float = 0.99) -> float:
    """The pooled q-quantile of `num`'s rounds over `den`'s, both taken from `cycles`."""
    return _upper(num.rounds, cycles, q) / _upper(den.rounds, cycles, q)


def beside_twin(num: Arm, den: Arm, cycles: list[int], q: float) -> float:
    """tail_ratio over the twin's: what the host's slow and fast spells did to both copies
    cancels, and with it whatever the capture did to the whole host (its CPU): what is
    left is what it did to the packets of the service it captured."""
    return tail_ratio(num, den, cycles, q) / (
        _upper(num.twin, cycles, q) / _upper(den.twin, cycles, q)
    )


def _upper(rounds: list[list[float]], cycles: list[int], q: float) -> float:
    # The pooled quantile from each round's largest values alone: the k-th largest of the
    # union needs at most k values of any round, and usually far fewer. Take a few times the
    # fair share first; if some round had all its taken values above the answer, it may
    # hold more, so take everything that could count and look again.
    total = sum(len(rounds[c]) for c in cycles)
    k = total - max(1, math.ceil(q * total)) + 1
    share = 4 * k // len(cycles) + 8
    while True:
        taken = [rounds[c][-share:] for c in cycles]
        top = sorted(v for t in taken for v in t)[-k]
        if share >= k or all(len(t) < share or t[0] < top for t in taken):
            return top
        share = k


def bootstrap(
    ratio: Callable[[list[int]], float], cycles: int, resamples: int, rng: random.Random
) -> tuple[float, float]:
    """A 95 % percentile interval of `ratio`, resampling whole cycles."""
    ratios = sorted(ratio([rng.randrange(cycles) for _ in range(cycles)]) for _ in range(resamples))
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


@dataclass
class Tap:
    """A capture arm: its process (one per tap, for the whole run) and what it reported."""

    proc: subprocess.Popen[str]
    arm: Arm = field(default_factory=Arm)
    seen: int = 0
    drops: int = 0
    cpu: float = 0.0
    interfaces: str = ""

    def start(self) -> None:
        """Returns once the capture is ready."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("start\n")
        self.proc.stdin.flush()
        if "capturing" not in self.proc.stdout.readline():
            raise RuntimeError("the capture did not start")

    def stop(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        messages, lost, self.interfaces, used = self.proc.stdout.readline().split()
        self.seen, self.drops = self.seen + int(messages), self.drops + int(lost)
        self.cpu += float(used)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        self.proc.stdout.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=RATE, help="requests/s, open-loop")
    parser.add_argument("--seconds", type=float, default=0.5, help="per round")
    parser.add_argument("--cycles", type=int, default=100, help="rounds of each arm")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument(
        "--lookup-every",
        type=int,
        default=1,
        help="the service resolves its dependency on every Nth request (1: on each)",
    )
    parser.add_argument(
        "--taps",
        default=",".join(TAPS),
        help=f"capture arms, comma-separated: {', '.join(TAPS + VARIANTS)}",
    )
    parser.add_argument(
        "--pin", action="store_true", help="load on one CPU; service, dnsmasq, capture on the rest"
    )
    parser.add_argument(
        "--tap-only",
        action="store_true",
        help="open the capture, never read it (the kernel's part)",
    )
    parser.add_argument(
        "--twin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load a copy of the service, never captured, side by side with it",
    )
    parser.add_argument(
        "--settle", type=float, default=SETTLE_S, help="seconds of rest before each round"
    )
    parser.add_argument(
        "--save", metavar="FILE", help="write every round's latencies (µs, as sent) as JSON"
    )
    args = parser.parse_args()
    chosen = [t for t in args.taps.split(",") if t]
    if not chosen or set(chosen) - set(TAPS + VARIANTS):
        parser.error(f"--taps takes {', '.join(TAPS + VARIANTS)}")
    if args.lookup_every < 1:
        parser.error("--lookup-every takes a positive count")
    if args.settle < 0:
        parser.error("--settle takes seconds, 0 or more")
    if os.geteuid() != 0:
        print("bench/overhead.py needs root (network namespaces)")
        return 2
    _precise_sleep()
    cpus = sorted(os.sched_getaffinity(0))
    pin: list[str] = []
    if args.pin and len(cpus) > 1:
        pin = ["taskset", "-c", ",".join(map(str, cpus[1:]))]
    off, again = Arm(), Arm()
    rng = random.Random()
    started = time.monotonic()
    script = TAP_ONLY if args.tap_only else CAPTURE
    with world(pin, args.lookup_every, args.twin) as w:
        taps = {
            name: Tap(
                _start(
                    [*pin, sys.executable, "-P", "-c", script, w.service, name],
                    stdin=subprocess.PIPE,
                )
            )
            for name in chosen
        }
        if pin:
            os.sched_setaffinity(0, cpus[:1])
        load_side_by_side(w.addresses, args.rate, 1.0)  # warm up: caches, dnsmasq's first answers
        names = ["off", "again", *taps]
        orders = []
        for _ in range(args.cycles):
            rng.shuffle(names)
            orders.append(list(names))
            for name in names:
                tap = taps.get(name)
                if tap is not None:
                    tap.start()
                time.sleep(args.settle)
                arm = off if name == "off" else again if tap is None else tap.arm
                arm.record(load_side_by_side(w.addresses, args.rate, args.seconds))
                if tap is not None:
                    tap.stop()
        for tap in taps.values():
            tap.close()
    elapsed = time.monotonic() - started
    if args.save:
        every = {"off": off, "again": again, **{n: t.arm for n, t in taps.items()}}
        saved = {"order": orders, "rounds": {n: a.raw for n, a in every.items()}}
        Path(args.save).write_text(json.dumps(saved))
    requests = sum(map(len, off.rounds))
    print(
        f"{requests} requests per arm at {args.rate}/s open-loop"
        + (" (and as many to the twin)" if args.twin else "")
        + f", {args.cycles} cycles of "
        f"{len(names)} {args.seconds:g} s rounds ({', '.join(['off', 'again', *taps])}) in "
        f"random order, {elapsed:.0f} s; load on CPU {cpus[0] if pin else 'any'}; a lookup "
        f"every {args.lookup_every} request(s)"
        + ("; taps opened, never read" if args.tap_only else "")
    )
    for name, tap in taps.items():
        expected = 2 * sum(map(len, tap.arm.rounds)) // args.lookup_every
        about = "" if args.lookup_every == 1 else "about "
        print(
            f"{name}: depdrill saw {tap.seen} DNS messages ({about}{expected} expected), "
            f"kernel drops {tap.drops}, capturing on {tap.interfaces}; the capture process took "
            f"{tap.cpu / (args.cycles * args.seconds):.1%} of a CPU while capturing"
        )
    arms = [("again", again), *((n, t.arm) for n, t in taps.items())]
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        for twin in (False, True)[: 1 + args.twin]:
            base = off.pooled(q, twin)
            values = [(n, a.pooled(q, twin)) for n, a in arms]
            print(
                f"{label}{' twin' if twin else ''}: off {base:.0f} µs, "
                + ", ".join(f"{n} {v:.0f} µs (x{v / base:.3f})" for n, v in values)
            )
    everything = list(range(args.cycles))
    limit = 1 + TARGET_RISE
    for name, arm in arms:
        rise = tail_ratio(arm, off, everything)
        low, high = bootstrap(partial(tail_ratio, arm, off), args.cycles, args.resamples, rng)
        if name == "again":
            verdict = "the bench's noise"
        elif high <= limit:
            verdict = f"target <= {limit:.2f} met"
        elif low > limit:
            verdict = f"target <= {limit:.2f} NOT met"
        else:
            verdict = f"target <= {limit:.2f} not resolved (the interval straddles it)"
        print(
            f"p99 {name + '/off':12} {rise:.3f}, 95 % interval [{low:.3f}, {high:.3f}]: {verdict}"
        )
    for name, arm in arms if args.twin else []:
        shares = []
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            ratio = partial(beside_twin, arm, off, q=q)
            low, high = bootstrap(ratio, args.cycles, args.resamples, rng)
            shares.append(f"{label} {ratio(everything):.3f} [{low:.3f}, {high:.3f}]")
        print(f"{name + '/off':16} beside the twin: {', '.join(shares)}")
    return 0


def _precise_sleep() -> None:
    """A 1 ns timer slack for this process, so a paced request starts when it is due."""
    import ctypes

    pr_set_timerslack = 29
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_timerslack, 1, 0, 0, 0)


if __name__ == "__main__":
    sys.exit(main())
