"""DNS messages per second that discovery captures and decodes without loss, as ratios.

dnsperf (Debian's) asks dnsmasq between two throwaway namespaces at a ladder of rates;
in the same run each capturer watches the client namespace: depdrill's live capture,
`tcpdump -w` (libpcap's TPACKET_V3 ring, no decoding) and scapy's `sniff` with its default
per-packet dissection. For each, the highest rate captured with < 0.1 % loss is printed,
and depdrill's as a ratio of the others. depdrill runs twice: on NAMES names asked over and
over (its parse cache answers), and on DISTINCT names each asked once (every message is
new: the DNS fast path, or dnspython, reads each). Offline figures give the per-message cost
of the fast path against dnspython alone, and a flood of random names through the graph
builder gives the peak memory it took.

Run as root: `make bench` or `.venv/bin/python -P bench/capture.py [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from depdrill.discover.correlate import GraphBuilder
from depdrill.discover.dissect import PacketEvent
from depdrill.discover.dns import DnsMessage
from depdrill.discover.run import DiscoverOptions, run
from depdrill.netns import Target

LOSS_LIMIT = 0.001
NAMES = 200
DISTINCT = 400_000
RUN = secrets.token_hex(2)
SCAPY_SNIFF = """
import sys
from scapy.all import AsyncSniffer
from scapy.layers.dns import DNS
count = 0
def seen(pkt):
    global count
    if DNS in pkt:
        count += 1
sniffer = AsyncSniffer(iface="eth0", filter="udp port 53", prn=seen, store=False,
                       started_callback=lambda: print("ready", flush=True))
sniffer.start()
sys.stdin.read()
sniffer.stop()
print(count, flush=True)
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@dataclass
class Bench:
    subnet: int
    client: str
    server: str
    queries: Path
    distinct: Path

    def address(self, host: int) -> str:
        return f"198.19.{self.subnet}.{host}"

    def ns(self, name: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", name, *argv]


@contextmanager
def bench_world() -> Iterator[Bench]:
    """Two namespaces on a bridge: dnsmasq answering NAMES names, and the client."""
    routes = sh("ip", "-4", "route").stdout
    subnet = next(k for k in range(200, 250) if f"198.19.{k}." not in routes)
    bridge, client, server = f"ddtb{RUN}", f"ddtb{RUN}-cli", f"ddtb{RUN}-srv"
    links: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="ddtbench"))
    dnsmasq: subprocess.Popen[bytes] | None = None
    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "addr", "add", f"198.19.{subnet}.1/24", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
        for i, (ns, host) in enumerate(((client, 10), (server, 53))):
            outer = f"ddtb{RUN}{i}o"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", f"ddtb{RUN}{i}i")
            links.append(outer)
            sh("ip", "link", "set", outer, "master", bridge, "up")
            sh("ip", "link", "set", f"ddtb{RUN}{i}i", "netns", ns)
            sh("ip", "-n", ns, "link", "set", f"ddtb{RUN}{i}i", "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"198.19.{subnet}.{host}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        records = [f"--host-record=n{i}.bench.test,198.19.{subnet}.{100 + i % 100}"
                   for i in range(NAMES)]  # fmt: skip
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", server, "dnsmasq", "--keep-in-foreground", "--no-resolv",
             "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces",
             f"--listen-address=198.19.{subnet}.53", "--local=/test/", "--pid-file=",
             "--cache-size=10000", "--log-facility=/dev/null", *records],
        )  # fmt: skip
        queries = tmp / "queries.txt"
        queries.write_text("".join(f"n{i}.bench.test A\n" for i in range(NAMES)))
        distinct = tmp / "distinct.txt"  # NXDOMAIN from dnsmasq, a new message every time
        distinct.write_text("".join(f"u{i}.miss.test A\n" for i in range(DISTINCT)))
        time.sleep(0.5)
        yield Bench(subnet, client, server, queries, distinct)
    finally:
        if dnsmasq is not None:
            dnsmasq.kill()
            dnsmasq.wait()
        for ns in (client, server):
            sh("ip", "netns", "del", ns, check=False)
        for link in links:
            sh("ip", "link", "del", link, check=False)
        sh("ip", "link", "del", bridge, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def dnsperf(bench: Bench, rate: int, seconds: float, queries: Path | None = None) -> int:
    """Send at `rate` queries/s; the DNS messages on the wire (queries sent + answers)."""
    out = sh(*bench.ns(bench.client, "dnsperf", "-s", bench.address(53),
                       "-d", str(queries or bench.queries), "-Q", str(rate),
                       "-l", str(seconds), "-c", "4", "-q", "2000", "-t", "2"))  # fmt: skip
    sent = int(re.search(r"Queries sent:\s+(\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"Queries completed:\s+(\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    return sent + done


def with_depdrill(
    bench: Bench, rate: int, seconds: float, queries: Path | None = None
) -> tuple[int, int]:
    options = DiscoverOptions(target=Target(netns=bench.client), duration_s=seconds + 30)
    stop, ready = threading.Event(), threading.Event()
    result: dict[str, int] = {}

    def capture() -> None:
        cpu = time.thread_time()
        graph = run(options, stop, ready)
        result["seen"] = graph.capture.dns_messages + graph.capture.malformed
        result["cpu_ms"] = int((time.thread_time() - cpu) * 1000)

    thread = threading.Thread(target=capture)
    thread.start()
    ready.wait(10)
    expected = dnsperf(bench, rate, seconds, queries)
    time.sleep(0.3)
    stop.set()
    thread.join()
    print(f"  depdrill  capture thread CPU {result['cpu_ms'] / 1000 / seconds:.0%} of one core "
          f"over the {seconds:g} s of load")  # fmt: skip
    return result["seen"], expected


def with_tcpdump(bench: Bench, rate: int, seconds: float) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".pcap") as pcap:
        argv = bench.ns(bench.client, "tcpdump", "-i", "eth0", "-B", "32768", "-w", pcap.name,
                        "udp port 53")  # fmt: skip
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        while "listening on" not in proc.stderr.readline():
            pass
        time.sleep(1.0)  # "listening on" comes before the ring is fully set up
        expected = dnsperf(bench, rate, seconds)
        time.sleep(1.5)  # the ring hands a block to tcpdump when full or after 1 s
        proc.terminate()
        _, err = proc.communicate(10)
    captured = int(re.search(r"(\d+) packets captured", err).group(1))  # type: ignore[union-attr]
    return captured, expected


def with_scapy(bench: Bench, rate: int, seconds: float) -> tuple[int, int]:
    argv = bench.ns(bench.client, sys.executable, "-c", SCAPY_SNIFF)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.readline()
    time.sleep(0.3)
    expected = dnsperf(bench, rate, seconds)
    time.sleep(0.5)
    out, _ = proc.communicate("", 60)
    return int(out.split()[-1]), expected


def lossless_rate(
    name: str, capture: Callable[[Bench, int, float], tuple[int, int]], bench: Bench,
    rates: list[int], seconds: float,
) -> int:  # fmt: skip
    """The highest rate (DNS messages/s on the wire) captured with loss under LOSS_LIMIT."""
    best = 0
    for rate in rates:
        seen, expected = capture(bench, rate, seconds)
        loss = 1 - seen / expected if expected else 1.0
        wire_rate = int(expected / seconds)
        print(f"  {name:9} asked {rate:>7}/s  wire {wire_rate:>7} msg/s  "
              f"seen {seen:>8}/{expected:<8} loss {loss:7.3%}", flush=True)  # fmt: skip
        if loss > LOSS_LIMIT:
            break
        best = max(best, wire_rate)
    return best


def with_depdrill_distinct(bench: Bench, rate: int, seconds: float) -> tuple[int, int]:
    return with_depdrill(bench, rate, seconds, bench.distinct)


def parse_cost(count: int) -> tuple[float, float]:
    """µs per message for the fast path and for dnspython alone, on distinct messages."""
    import dns.message
    import dns.rrset

    from depdrill.discover import fastdns
    from depdrill.discover.dns import parse_with_dnspython

    wires = []
    for i in range(count):
        name = f"host{i}.svc{i % 7}.example.test"
        query = dns.message.make_query(name, "A", id=i & 0xFFFF)
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(name + ".", i % 300, "IN", "A", "198.19.1.5"))
        wires += [query.to_wire(), response.to_wire()]
    costs = []
    for parse in (fastdns.parse, parse_with_dnspython):
        started = time.perf_counter()
        for wire in wires:
            parse(wire)
        costs.append((time.perf_counter() - started) / len(wires) * 1e6)
    return costs[0], costs[1]


def flood_memory(names: int) -> tuple[float, float]:
    """Peak RSS growth (MB) and seconds to feed `names` random names through the builder."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    builder = GraphBuilder(["198.19.0.10"], "flood", max_names=10_000)
    started = time.perf_counter()
    for i in range(names):
        label = secrets.token_hex(6)
        query = DnsMessage(i & 0xFFFF, False, "NOERROR", False, f"{label}.flood.test", "A")
        answer = DnsMessage(i & 0xFFFF, True, "NXDOMAIN", False, f"{label}.flood.test", "A")
        t = i / 1000
        builder.add(PacketEvent(t, "198.19.0.10", "198.19.0.53", 40000, 53, "udp", dns=(query,)))
        builder.add(PacketEvent(t, "198.19.0.53", "198.19.0.10", 53, 40000, "udp", dns=(answer,)))
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return after - before, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter steps")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("dnsperf") is None:
        print("bench/capture.py needs root and dnsperf (apt-get install dnsperf)")
        return 2
    seconds = 1.5 if args.quick else args.seconds
    rates = [2_000, 16_000, 32_000, 64_000] if args.quick else [
        2_000, 8_000, 16_000, 32_000, 48_000, 64_000, 80_000, 96_000, 128_000]  # fmt: skip
    # The flood first: ru_maxrss is a peak, so nothing bigger may run before it.
    names = 100_000 if args.quick else 1_000_000
    grown, elapsed = flood_memory(names)
    with bench_world() as bench:
        print(f"dnsperf -> dnsmasq, {seconds:g} s per step, lossless means < {LOSS_LIMIT:.1%}")
        depdrill = lossless_rate("depdrill", with_depdrill, bench, rates, seconds)
        distinct = lossless_rate("depdrill*", with_depdrill_distinct, bench, rates, seconds)
        tcpdump = lossless_rate("tcpdump", with_tcpdump, bench, rates, seconds)
        scapy = lossless_rate("scapy", with_scapy, bench, [500, 1_000, *rates[:4]], seconds)
    print(f"lossless DNS messages/s: depdrill {depdrill} ({NAMES} names), depdrill* {distinct} "
          f"(every message new), tcpdump -w {tcpdump} (capped by the ladder or the load "
          f"generator), scapy sniff {scapy}")  # fmt: skip
    if tcpdump:
        print(f"depdrill / tcpdump -w: {depdrill / tcpdump:.2f}")
    if scapy:
        print(f"depdrill / scapy sniff: {depdrill / scapy:.2f}")
    fast, slow = parse_cost(20_000)
    print(f"parse of distinct messages: fast path {fast:.1f} µs, dnspython {slow:.1f} µs "
          f"({slow / fast:.1f}x)")  # fmt: skip
    print(
        f"flood of {names} random names: peak RSS +{grown:.0f} MB, "
        f"{names / elapsed:,.0f} names/s through the graph builder"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
