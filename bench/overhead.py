"""The service's own p99 latency while depdrill captures in its namespace, against without.

A tiny HTTP service in a throwaway namespace resolves a name through dnsmasq (in a second
namespace) for every request, so each request puts two DNS messages and a SYN (the one the
service accepts: the filter keeps it in the kernel) in front of the capture. The load is
open-loop at a fixed rate (RATE requests/s, a quarter of what the service can take here),
one connection per request, as a production host sees it: a request starts at its
scheduled time whatever the one before it did, and when the one before it ran past that
time its latency counts from the scheduled time (the wait a real client would have seen),
so a slow stretch cannot hide by slowing the load down. The earlier version ran requests
back to back, closed-loop: the load loop, the service and dnsmasq then kept a core busy
between them, and on 2 cores any CPU the capture used at all showed up as latency, which
is not what a service that is not saturated sees.

Rounds with and without `depdrill.discover.run` (in its own process, as the CLI runs it,
started before the round and ready before its first request) alternate in one run, the
order swapped every pair, so drift and other load on the box hit both arms; the pooled
p99s and their ratio are printed against the target (a rise of at most 2 %), with the
median of the per-pair ratios as a check that one disturbed round did not decide it.

Run as root: `.venv/bin/python -P bench/overhead.py [--rate N] [--seconds S] [--pairs N]`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

RUN = secrets.token_hex(2)
PORT = 8080
TARGET_RISE = 0.02
RATE = 2000

SERVICE = """
import socket, sys, os
resolver = sys.argv[1]
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
    dns.send(n.to_bytes(2, "big") + query[2:])
    dns.recv(512)
    conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    conn.close()
"""

# One process for the whole run (its start-up is not what is measured): each "start" line
# begins a discovery run (ready when it is filtering), each "stop" ends it and prints counts.
# Between runs it sleeps on stdin, its socket closed: the service runs as if it were absent.
CAPTURE = """
import sys, threading
from depdrill.discover.run import DiscoverOptions, run
from depdrill.netns import Target
options = DiscoverOptions(target=Target(netns=sys.argv[1]), duration_s=3600)
print("ready", flush=True)
for line in sys.stdin:
    stop, ready, graphs = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=lambda: graphs.append(run(options, stop, ready)))
    thread.start()
    ready.wait()
    print("capturing", flush=True)
    sys.stdin.readline()
    stop.set()
    thread.join()
    print(graphs[0].capture.dns_messages, graphs[0].capture.kernel_drops, flush=True)
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@dataclass
class World:
    service: str
    address: str


def _start(argv: list[str], **kwargs: object) -> subprocess.Popen[str]:
    proc = subprocess.Popen(  # type: ignore[call-overload]
        argv, stdout=subprocess.PIPE, text=True, **kwargs
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        raise RuntimeError(f"{argv[:5]} did not start: {line!r}")
    return proc  # type: ignore[no-any-return]


@contextmanager
def world() -> Iterator[World]:
    """The service (.10) and dnsmasq (.53) on a bridge whose host side is .1."""
    routes = sh("ip", "-4", "route").stdout
    subnet = next(k for k in range(150, 200) if f"198.19.{k}." not in routes)
    bridge, service, dns = f"ddto{RUN}", f"ddto{RUN}-svc", f"ddto{RUN}-dns"
    links: list[str] = []
    procs: list[subprocess.Popen[str]] = []
    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "addr", "add", f"198.19.{subnet}.1/24", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
        for i, (ns, host) in enumerate(((service, 10), (dns, 53))):
            outer, inner = f"ddto{RUN}{i}o", f"ddto{RUN}{i}i"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            links.append(outer)
            sh("ip", "link", "set", outer, "master", bridge, "up")
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "-n", ns, "link", "set", inner, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"198.19.{subnet}.{host}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"198.19.{subnet}.1")
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", dns, "dnsmasq", "--keep-in-foreground", "--no-resolv",
                 "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces",
                 f"--listen-address=198.19.{subnet}.53", "--local=/test/", "--pid-file=",
                 "--log-facility=/dev/null", f"--host-record=api.bnch.test,198.19.{subnet}.20"],
                text=True,
            )
        )  # fmt: skip
        time.sleep(0.3)
        service_argv = [sys.executable, "-c", SERVICE, f"198.19.{subnet}.53"]
        procs.append(_start(["ip", "netns", "exec", service, *service_argv]))
        yield World(service, f"198.19.{subnet}.10")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for ns in (service, dns):
            sh("ip", "netns", "del", ns, check=False)
        for link in links:
            sh("ip", "link", "del", link, check=False)
        sh("ip", "link", "del", bridge, check=False)


def load(address: str, rate: int, seconds: float) -> list[float]:
    """Requests at `rate`/s for `seconds`, one connection each; each one's latency in µs."""
    interval_ns = 10**9 // rate
    latencies = []
    start = time.perf_counter_ns() + 1_000_000
    free_at = start  # when the request before this one finished
    for i in range(int(rate * seconds)):
        due = start + i * interval_ns
        while (wait := due - time.perf_counter_ns()) > 0:
            time.sleep(wait / 1e9)
        began = time.perf_counter_ns()
        # Late because the one before ran past `due`: this one waited that long, count it.
        # Late only by the sleep's own slack: the load's fault, not the service's.
        origin = due if free_at > due else began
        with socket.create_connection((address, PORT), timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while conn.recv(4096):
                pass
        free_at = time.perf_counter_ns()
        latencies.append((free_at - origin) / 1000)
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=RATE, help="requests/s, open-loop")
    parser.add_argument("--seconds", type=float, default=1.0, help="per round")
    parser.add_argument("--pairs", type=int, default=30, help="rounds of each kind")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/overhead.py needs root (network namespaces)")
        return 2
    _precise_sleep()
    without: list[float] = []
    captured: list[float] = []
    ratios: list[float] = []
    seen = drops = 0
    with world() as w:
        capture = _start([sys.executable, "-P", "-c", CAPTURE, w.service], stdin=subprocess.PIPE)
        assert capture.stdin is not None and capture.stdout is not None
        load(w.address, args.rate, 1.0)  # warm up: caches, the first dnsmasq answers
        for pair in range(args.pairs):
            rounds: dict[bool, list[float]] = {}
            for capturing in (False, True) if pair % 2 == 0 else (True, False):
                if not capturing:
                    rounds[False] = load(w.address, args.rate, args.seconds)
                    continue
                capture.stdin.write("start\n")
                capture.stdin.flush()
                if "capturing" not in capture.stdout.readline():
                    raise RuntimeError("the capture did not start")
                rounds[True] = load(w.address, args.rate, args.seconds)
                capture.stdin.write("stop\n")
                capture.stdin.flush()
                counts = capture.stdout.readline().split()
                seen, drops = seen + int(counts[0]), drops + int(counts[1])
            without += rounds[False]
            captured += rounds[True]
            ratios.append(p99(rounds[True]) / p99(rounds[False]))
        capture.stdin.close()
        capture.wait(30)
        capture.stdout.close()
    off, on = p99(without), p99(captured)
    print(
        f"{len(without)} requests per side at {args.rate}/s open-loop, {args.pairs} alternating "
        f"pairs of {args.seconds:g} s rounds; depdrill saw {seen} DNS messages "
        f"({2 * len(captured)} expected), kernel drops {drops}"
    )
    p50_off, p50_on = statistics.median(without), statistics.median(captured)
    print(f"p50 without {p50_off:.0f} µs, with {p50_on:.0f} µs")
    print(
        f"p99 without {off:.0f} µs, with {on:.0f} µs: ratio {on / off:.3f} "
        f"(target <= {1 + TARGET_RISE:.2f}); median of the per-pair p99 ratios "
        f"{statistics.median(ratios):.3f}"
    )
    return 0


def _precise_sleep() -> None:
    """A 1 ns timer slack for this process, so a paced request starts when it is due."""
    import ctypes

    pr_set_timerslack = 29
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_timerslack, 1, 0, 0, 0)


if __name__ == "__main__":
    sys.exit(main())
