"""NFQUEUE latency accuracy: injected delay against measured RTT, up to 10 000 packets/s.

A UDP echo server (its own process) in a dependency namespace, and a client (its own
process) in the service namespace sending numbered datagrams at a fixed rate; the RTT of
each is its send time against the moment the client read its echo. (Not the kernel's
receive timestamp, SO_TIMESTAMPNS: the kernel stamps a packet as it arrives, before the
netfilter INPUT hook, so a delay in NFQUEUE never shows in it.)

The method, so that the box's own noise falls on both sides alike:
- For each rate, baseline rounds (no fault) and injected rounds (10/100/1000 ms through
  depdrill's NfqueueLatency, held by its release process as the runner holds it) are
  interleaved, `--rounds` times, the order rotated each time; the samples of each point
  are pooled over its rounds.
- Error of a point = its percentile - injected delay - the same percentile of the pooled
  baseline of that rate (p50 and p99). Each point prints pass or FAIL against the targets.
- The client and the echo server are the instrument: with `--instruments fifo` (default,
  when the capability exists) they run SCHED_FIFO, above every ordinary process and below
  the release process, so what is measured is the injector and not the instrument waiting
  for a core. `--instruments
  other` runs them as ordinary processes. `--load N` starts N busy loops (ordinary
  priority) for the whole run: the shared-box condition, made repeatable; `--busy-thread`
  spins a thread in this process, which holds the fault as the runner does.
- "late p50/p99" is the release process's own account: how late its verdicts left against
  the release time, the part of the error that is the injector's scheduling. "steal" is
  the time the hypervisor took the VM's CPUs away during the point (no priority inside the
  VM helps then: a SCHED_FIFO loop saw 1 ms+ wake-ups only while steal rose). A round,
  baseline or injected alike, during which steal rose is measured again, up to
  `--steal-retries` times (3; 0 keeps every round), and the table counts those re-runs:
  the target is the injector's accuracy, and a stolen CPU is the host's doing. Steal is
  counted in ticks (10 ms), so a short theft can still pass unseen.
Target (issue 6): p50 error <= 0.2 ms, p99 <= 1 ms, no loss, held up to 10 000 packets/s.

    python -P bench/latency.py [--seconds 1] [--rounds 3] [--rates 100,1000,5000,10000]
                               [--delays 10,100,1000] [--instruments fifo|other] [--load 0]
                               [--busy-thread] [--steal-retries 3]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from depdrill.artifact import utcnow
from depdrill.execute.injectors.base import FaultContext
from depdrill.execute.injectors.nfqueue_latency import NfqueueLatency
from depdrill.generate.model import LatencyFault
from depdrill.netns import Target
from depdrill.testing import RUN, ScratchNet, scratch_bridge

PORT = 7021
HEADER = struct.Struct("!QQ")  # sequence number, send time (ns, CLOCK_MONOTONIC)
TAIL_S = 1.0
MIN_SAMPLES = 1000  # per point, so that a p99 is not one of three stray packets
# Below the release process's SCHED_FIFO 10 (an instrument busy at 10 000 packets/s must
# not hold the releaser off a core) and above every ordinary process.
INSTRUMENT_PRIORITY = 5
P50_TARGET_MS = 0.2
P99_TARGET_MS = 1.0


def echo(address: str) -> None:
    """Echo every datagram back until killed."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((address, PORT))
        print("ready", flush=True)
        while True:
            data, peer = sock.recvfrom(2048)
            sock.sendto(data, peer)


def client(address: str, rate: int, seconds: float, tail_s: float) -> None:
    """Send `rate` datagrams a second for `seconds`; print every RTT (ms) as JSON."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.connect((address, PORT))
        sock.setblocking(False)
        total = int(rate * seconds)
        interval = 1.0 / rate
        rtts: list[float] = []
        errors = 0
        start = time.monotonic()
        sent = 0

        def drain() -> None:
            while True:
                try:
                    data = sock.recv(64)
                except BlockingIOError:
                    return
                received_ns = time.monotonic_ns()
                _, sent_ns = HEADER.unpack(data[: HEADER.size])
                rtts.append(round((received_ns - sent_ns) / 1e6, 4))

        while sent < total:
            due = start + sent * interval
            now = time.monotonic()
            if now < due:
                select.select([sock], [], [], due - now)
                drain()
                continue
            # Behind schedule (a busy core): send what is due, never more than a burst of 8.
            for _ in range(min(8, total - sent)):
                try:
                    sock.send(HEADER.pack(sent, time.monotonic_ns()))
                except BlockingIOError:
                    errors += 1
                sent += 1
            drain()
        elapsed = time.monotonic() - start
        stop = time.monotonic() + tail_s
        while len(rtts) < total and time.monotonic() < stop:
            select.select([sock], [], [], 0.05)
            drain()
        print(json.dumps({"sent": total, "errors": errors, "rate": total / elapsed, "rtts": rtts}))


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Point:
    """The pooled samples of one (rate, delay) over its rounds; delay 0 is the baseline."""

    rate: int
    delay: int
    sent: int = 0
    errors: int = 0
    seconds: float = 0.0
    rtts: list[float] = field(default_factory=list)
    late_p50_us: list[int] = field(default_factory=list)
    late_p99_us: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    policies: set[str] = field(default_factory=set)
    steal_ms: float = 0.0  # in the rounds kept
    discarded_steal_ms: float = 0.0  # in the rounds measured again
    reruns: int = 0
    major_faults: int = 0

    @property
    def lost(self) -> int:
        return self.sent - len(self.rtts) + self.errors


@contextmanager
def busy_loops(count: int, thread: bool) -> Iterator[None]:
    """`count` ordinary-priority processes that spin: other people's work on the box; and
    with `thread`, a thread of this process that spins, as the runner's other threads may."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,), daemon=True)
    if thread:
        spinner.start()
    try:
        yield
    finally:
        stop.set()
        if thread:
            spinner.join()
        for loop in loops:
            loop.kill()
            loop.wait()


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


def steal_ms() -> float:
    """CPU time the hypervisor took from this machine's CPUs so far (/proc/stat steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")


def fifo_permitted() -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return True


class Bench:
    def __init__(self, net: ScratchNet, instruments: str) -> None:
        self.net = net
        self.service = net.add("s", 2)
        self.dependency = net.add("d", 3)
        self.address = net.address(3)
        self.priority = (
            ["chrt", "-f", str(INSTRUMENT_PRIORITY)] if instruments.startswith("fifo") else []
        )
        self.injector = NfqueueLatency()

    def instrument(self, namespace: str, *args: str) -> list[str]:
        me = [sys.executable, "-P", str(Path(__file__).resolve())]
        return ["ip", "netns", "exec", namespace, *self.priority, *me, *args]

    def measure(self, rate: int, seconds: float) -> dict[str, object]:
        done = subprocess.run(
            self.instrument(
                self.service,
                "--role",
                "client",
                "--to",
                self.address,
                "--rate",
                str(rate),
                "--seconds",
                str(seconds),
                "--tail",
                str(max(TAIL_S, 2 * seconds)),
            ),
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, object] = json.loads(done.stdout)
        return result

    def round(self, point: Point, seconds: float, steal_retries: int) -> None:
        """One round of the point; measured again (up to `steal_retries` times) while the
        hypervisor took CPU during it, whichever arm it is."""
        for retry in range(steal_retries + 1):
            kept = self._measure_round(point, seconds, final=retry == steal_retries)
            if kept:
                return
            point.reruns += 1

    def _measure_round(self, point: Point, seconds: float, final: bool) -> bool:
        handle = None
        if point.delay:
            ctx = FaultContext(
                target=Target(netns=self.service),
                run_id="benchlat",
                test_id=f"{point.rate}-{point.delay}",
                deadline=utcnow() + timedelta(seconds=seconds * 3 + 30),
            )
            fault = LatencyFault(addresses=[self.address], ports=[PORT], delay_ms=point.delay)
            handle = self.injector.apply(fault, ctx)
        stolen = steal_ms()
        try:
            data = self.measure(point.rate, seconds)
            stolen = steal_ms() - stolen
        finally:
            if handle is not None:
                self.injector.revert(handle)
        if stolen and not final:
            point.discarded_steal_ms += stolen
            return False
        point.steal_ms += stolen
        if handle is not None:
            stats = handle.delay.stats
            point.policies.add(str(stats.get("policy", "?")))
            for key, into in (
                ("late_p50_us", point.late_p50_us),
                ("late_p99_us", point.late_p99_us),
            ):
                late = stats.get(key)
                if isinstance(late, int):
                    into.append(late)
            point.major_faults += int(stats.get("major_faults", 0))
            cpu_s, held_s = stats.get("cpu_s"), stats.get("seconds")
            if isinstance(cpu_s, float | int) and isinstance(held_s, float | int) and held_s:
                point.cpu.append(cpu_s / held_s)
        rtts = data["rtts"]
        assert isinstance(rtts, list)
        point.rtts += rtts
        point.sent += int(str(data["sent"]))
        point.errors += int(str(data["errors"]))
        point.seconds += int(str(data["sent"])) / float(str(data["rate"]))
        return True


def run(
    rates: list[int],
    delays: list[int],
    seconds: float,
    rounds: int,
    instruments: str,
    load: int,
    busy_thread: bool,
    steal_retries: int,
) -> bool:
    if instruments == "fifo" and not fifo_permitted():
        instruments = "other (SCHED_FIFO not permitted)"
    met = True
    with scratch_bridge(900, f"ddt{RUN}bl") as net, busy_loops(load, busy_thread):
        bench = Bench(net, instruments)
        server = subprocess.Popen(
            bench.instrument(bench.dependency, "--role", "echo", "--to", bench.address),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            with server.stdout:
                assert server.stdout.readline().strip() == "ready"
            bench.measure(100, 0.2)  # ARP and caches settle first
            print(
                f"instruments: {instruments}; busy loops: {load}; busy thread in the injecting "
                f"process: {'yes' if busy_thread else 'no'}; interleaved rounds per point: "
                f"{rounds}; a round the hypervisor stole CPU from is measured again up to "
                f"{steal_retries}x"
            )
            print(
                f"{'rate/s':>7} {'delay':>6} {'samples':>7} {'sent/s':>7} {'base p50':>9} "
                f"{'base p99':>9} {'p50 ms':>10} {'p99 ms':>10} {'p50 err':>8} {'p99 err':>8} "
                f"{'late p50/p99':>12} {'cpu':>4} {'mf':>3} {'steal':>5} {'rerun':>5} {'lost':>5}  "
                f"{'releaser':<8} result"
            )
            for rate in rates:
                # Short rounds at low rates would leave a p99 resting on two or three packets.
                round_s = max(seconds, MIN_SAMPLES / (rate * rounds))
                baseline = Point(rate, 0)
                points = [Point(rate, d) for d in delays]
                order = [baseline, *points]
                for index in range(rounds):
                    shift = index % len(order)
                    for point in order[shift:] + order[:shift]:
                        bench.round(point, round_s, steal_retries)
                met &= report(baseline, points)
        finally:
            server.kill()
            server.wait()
    print("err = percentile(injected) - injected delay - same percentile(baseline, same rate);")
    print("late = the release process's verdicts against their release time (worst round);")
    print("cpu = the release process's CPU time over its lifetime (worst round);")
    print("mf = major page faults of the release processes (all rounds);")
    print("steal = ms the hypervisor took from this VM's CPUs during the point's kept rounds;")
    print("rerun = rounds measured again because the hypervisor took CPU during them")
    verdict = "met" if met else "MISSED"
    print(
        f"target p50 err <= {P50_TARGET_MS} ms, p99 err <= {P99_TARGET_MS} ms, no loss: {verdict}"
    )
    return met


def report(baseline: Point, points: list[Point]) -> bool:
    base50, base99 = percentile(baseline.rtts, 0.5), percentile(baseline.rtts, 0.99)
    print(
        f"{baseline.rate:7d} {'none':>6} {len(baseline.rtts):7d} "
        f"{baseline.sent / baseline.seconds:7.0f} {base50:9.3f} {base99:9.3f} {'':>10} {'':>10} "
        f"{'':>8} {'':>8} {'':>12} {'':>4} {'':>3} {baseline.steal_ms:5.0f} "
        f"{baseline.reruns:5d} {baseline.lost:5d}",
        flush=True,
    )
    met = True
    for point in points:
        p50, p99 = percentile(point.rtts, 0.5), percentile(point.rtts, 0.99)
        err50, err99 = p50 - point.delay - base50, p99 - point.delay - base99
        ok = abs(err50) <= P50_TARGET_MS and abs(err99) <= P99_TARGET_MS and point.lost == 0
        met &= ok
        late = "?"
        if point.late_p50_us and point.late_p99_us:
            late = f"{max(point.late_p50_us)}/{max(point.late_p99_us)}us"
        cpu = f"{max(point.cpu):4.0%}" if point.cpu else "   ?"
        print(
            f"{point.rate:7d} {point.delay:6d} {len(point.rtts):7d} "
            f"{point.sent / point.seconds:7.0f} {base50:9.3f} {base99:9.3f} {p50:10.3f} "
            f"{p99:10.3f} {err50:+8.3f} {err99:+8.3f} {late:>12} {cpu} {point.major_faults:3d} "
            f"{point.steal_ms:5.0f} {point.reruns:5d} {point.lost:5d}  "
            f"{','.join(sorted(point.policies)):<8} {'pass' if ok else 'FAIL'}",
            flush=True,
        )
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["bench", "echo", "client"], default="bench")
    parser.add_argument("--to", default="")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--tail", type=float, default=TAIL_S)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rates", default="100,1000,5000,10000")
    parser.add_argument("--delays", default="10,100,1000")
    parser.add_argument("--instruments", choices=["fifo", "other"], default="fifo")
    parser.add_argument("--load", type=int, default=0)
    parser.add_argument("--busy-thread", action="store_true")
    parser.add_argument(
        "--steal-retries",
        type=int,
        default=3,
        help="measure a round again while the hypervisor stole CPU during it (0: keep all)",
    )
    args = parser.parse_args()
    if args.role == "echo":
        echo(args.to)
        return 0
    if args.role == "client":
        client(args.to, args.rate, args.seconds, args.tail)
        return 0
    rates = [int(r) for r in args.rates.split(",")]
    delays = [int(d) for d in args.delays.split(",")]
    met = run(
        rates,
        delays,
        args.seconds,
        args.rounds,
        args.instruments,
        args.load,
        args.busy_thread,
        args.steal_retries,
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
