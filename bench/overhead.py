"""The service's own p99 latency while depdrill captures in its namespace, against without.

A tiny HTTP service in a throwaway namespace resolves a name through dnsmasq (in a second
namespace) for every request, so each request puts a SYN and two DNS messages in front of
the capture. A load loop on the host opens a connection per request. Rounds with and without
`depdrill.discover.run` (in its own process, as the CLI runs it) alternate in one run so
drift hits both; the p99s and their ratio are printed (target: a rise of at most 2 %).

Run as root: `.venv/bin/python -P bench/overhead.py [--requests N] [--rounds N]`.
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

CAPTURE = """
import sys, threading
from depdrill.discover.run import DiscoverOptions, run
from depdrill.netns import Target
stop, ready = threading.Event(), threading.Event()
threading.Thread(target=lambda: (ready.wait(), print("ready", flush=True),
                 sys.stdin.read(), stop.set()), daemon=True).start()
graph = run(DiscoverOptions(target=Target(netns=sys.argv[1]), duration_s=3600), stop, ready)
print(graph.capture.dns_messages, graph.capture.kernel_drops, flush=True)
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


def load(address: str, requests: int) -> list[float]:
    """One connection per request, one after another; each request's latency in µs."""
    latencies = []
    for _ in range(requests):
        started = time.perf_counter_ns()
        with socket.create_connection((address, PORT), timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while conn.recv(4096):
                pass
        latencies.append((time.perf_counter_ns() - started) / 1000)
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="per round")
    parser.add_argument("--rounds", type=int, default=6, help="of each kind, alternating")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/overhead.py needs root (network namespaces)")
        return 2
    without: list[float] = []
    captured: list[float] = []
    seen = drops = 0
    with world() as w:
        load(w.address, 300)  # warm up: caches, the first dnsmasq answers
        for _ in range(args.rounds):
            without += load(w.address, args.requests)
            capture = _start(
                [sys.executable, "-P", "-c", CAPTURE, w.service],
                stdin=subprocess.PIPE,
            )
            captured += load(w.address, args.requests)
            out, _ = capture.communicate("", 30)
            counts = out.split()
            seen, drops = seen + int(counts[0]), drops + int(counts[1])
    off, on = p99(without), p99(captured)
    print(
        f"{len(without)} requests per side, {args.rounds} alternating rounds; depdrill saw "
        f"{seen} DNS messages (2 per request expected), kernel drops {drops}"
    )
    p50_off, p50_on = statistics.median(without), statistics.median(captured)
    print(f"p50 without {p50_off:.0f} µs, with {p50_on:.0f} µs")
    print(
        f"p99 without {off:.0f} µs, with {on:.0f} µs: ratio {on / off:.3f} "
        f"(target <= {1 + TARGET_RISE:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
