"""DNS messages per second that discovery captures and decodes without loss, as ratios.

The load is real DNS traffic replayed at a set rate. dnsperf (Debian's) first asks dnsmasq
between two throwaway namespaces while `tcpdump -w` records the client's side: once on
NAMES names asked over and over, once on DISTINCT names each asked once (every message
new). A sender process then replays each recording, queries and answers both, from a
PACKET_TX_RING onto the host end of the client's veth, at a ladder of rates: one syscall
sends a batch of frames, so on this 2-core box the sender outruns any live DNS load
generator (dnsperf against dnsmasq tops out near 110 000 messages/s here, under what
tcpdump keeps up with). The sender knows exactly how many frames it sent; the veth's own
drop counter shows none were lost before the capture point. Frames go to a MAC that is not
the client's, so its IP stack drops them right after the packet taps (no ICMP, no replies).

In the same run each capturer watches the client's eth0: depdrill's live capture (run()
in a thread, as the CLI runs it) through its default tap (`--tap ebpf`: tcx ingress sees
the frames before the IP stack drops them) and through the packet socket (`--tap
packet`), `tcpdump -w` (libpcap's TPACKET_V3 ring, no decoding) and scapy's `sniff` with
its default per-packet dissection. depdrill's nflog
tap sees only what the client's IP stack takes in (its input and output hooks), so it is
measured on a second replay of the same recordings, addressed to the client: each frame to
its MAC, each query with its addresses swapped so it arrives from the server on port 53
(both checksums unchanged); the packet tap runs on that replay too, for the ratio. For
each, the highest rate captured with < 0.1 % loss is printed, and depdrill's as a ratio
of the others. A step
(--seconds, 3 by default) lasts several times what depdrill's 32 MiB ring holds at these
rates (under a second), so the ring cannot hide a capture slower than the wire. Offline
figures give the per-message cost of the fast path against dnspython alone, and a flood
of random names through the graph builder gives the peak memory it took.

Run as root: `make bench` or `.venv/bin/python -P bench/capture.py [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import resource
import secrets
import shutil
import socket
import struct
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
from depdrill.discover.run import DiscoverOptions, TapChoice, run
from depdrill.netns import Target
from depdrill.testing import RUN, scratch_bridge, sh

LOSS_LIMIT = 0.001
NAMES = 200
DISTINCT = 150_000
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
# PACKET_TX_RING with TPACKET_V2 frames (linux/if_packet.h)
SOL_PACKET = 263
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_QDISC_BYPASS = 20
TPACKET_V2 = 1
TP_STATUS_SEND_REQUEST = 1
TX_FRAME = 2048
TX_FRAMES = 4096
TX_DATA_AT = 32  # TPACKET2_HDRLEN - sizeof(struct sockaddr_ll): where a frame's bytes go
FOREIGN_MAC = bytes.fromhex("02dd000000fe")  # not the client's: its IP stack drops them


@dataclass
class Bench:
    subnet: int
    client: str
    server: str
    host_end: str  # the client's veth, host side: the sender writes here
    client_mac: str
    queries: Path
    distinct: Path
    tmp: Path

    def address(self, host: int) -> str:
        return f"198.19.{self.subnet}.{host}"

    def ns(self, name: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", name, *argv]


@contextmanager
def bench_world() -> Iterator[Bench]:
    """Two namespaces on a bridge: dnsmasq answering NAMES names, and the client."""
    tmp = Path(tempfile.mkdtemp(prefix="ddtbench"))
    dnsmasq: subprocess.Popen[bytes] | None = None
    with scratch_bridge(0, f"ddtb{RUN}") as net:
        try:
            client, server = net.add("cli", 10), net.add("srv", 53)
            records = [f"--host-record=n{i}.bench.test,{net.address(100 + i % 100)}"
                       for i in range(NAMES)]  # fmt: skip
            dnsmasq = subprocess.Popen(
                ["ip", "netns", "exec", server, "dnsmasq", "--keep-in-foreground", "--no-resolv",
                 "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces",
                 f"--listen-address={net.address(53)}", "--local=/test/", "--pid-file=",
                 "--cache-size=10000", "--log-facility=/dev/null", *records],
            )  # fmt: skip
            queries = tmp / "queries.txt"
            queries.write_text("".join(f"n{i}.bench.test A\n" for i in range(NAMES)))
            distinct = tmp / "distinct.txt"  # NXDOMAIN from dnsmasq, a new message every time
            distinct.write_text("".join(f"u{i}.miss.test A\n" for i in range(DISTINCT)))
            time.sleep(0.5)
            link = sh("ip", "-n", client, "-j", "link", "show", "eth0").stdout
            client_mac = json.loads(link)[0]["address"]
            yield Bench(
                net.subnet, client, server, net.links[0], client_mac, queries, distinct, tmp
            )
        finally:
            if dnsmasq is not None:
                dnsmasq.kill()
                dnsmasq.wait()
            shutil.rmtree(tmp, ignore_errors=True)


def record(bench: Bench, queries: Path, pcap: Path, rate: int, argv: list[str]) -> int:
    """dnsperf against dnsmasq at `rate` queries/s, recorded on the client's eth0; frames."""
    tcpdump = subprocess.Popen(
        bench.ns(bench.client, "tcpdump", "-i", "eth0", "-B", "65536", "-s", "0", "-w",
                 str(pcap), "udp port 53"),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert tcpdump.stderr is not None
    while "listening on" not in tcpdump.stderr.readline():
        pass
    time.sleep(1.0)  # "listening on" comes before the ring is fully set up
    sh(*bench.ns(bench.client, "dnsperf", "-s", bench.address(53), "-d", str(queries),
                 "-Q", str(rate), "-c", "4", "-q", "2000", "-t", "2", *argv))  # fmt: skip
    time.sleep(1.5)  # the ring hands a block to tcpdump when full or after 1 s
    tcpdump.terminate()
    _, err = tcpdump.communicate(10)
    return int(re.search(r"(\d+) packets captured", err).group(1))  # type: ignore[union-attr]


def pcap_frames(path: Path, to: bytes = FOREIGN_MAC) -> list[bytes]:
    """The Ethernet frames of a classic pcap file, each sent to the MAC `to`.

    To another MAC than FOREIGN_MAC (the client's own) every frame is made one the client
    receives: a query (client to server) gets its IPv4 addresses swapped, which leaves both
    checksums as they were, so it arrives from the server with destination port 53.
    """
    data = path.read_bytes()
    order = "<" if data[:4] == bytes.fromhex("d4c3b2a1") else ">"
    at, frames = 24, []
    while at + 16 <= len(data):
        size = struct.unpack_from(order + "I", data, at + 8)[0]
        frame = data[at + 16 : at + 16 + size]
        at += 16 + size
        if len(frame) == size <= TX_FRAME - TX_DATA_AT:
            if to != FOREIGN_MAC and frame[12:14] == b"\x08\x00" and frame[36:38] == b"\0\x35":
                frame = frame[:26] + frame[30:34] + frame[26:30] + frame[34:]
            frames.append(to + frame[6:])
    return frames


def sender(interface: str, pcap: str, to: str) -> int:
    """The replay process: reads "RATE SECONDS" lines, answers "SENT ELAPSED" for each."""
    frames = pcap_frames(Path(pcap), bytes.fromhex(to.replace(":", "")))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: sends only
    sock.bind((interface, 0))
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
    sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    block = 1 << 20
    sock.setsockopt(
        SOL_PACKET,
        PACKET_TX_RING,
        struct.pack("=4I", block, TX_FRAME * TX_FRAMES // block, TX_FRAME, TX_FRAMES),
    )
    ring = mmap.mmap(sock.fileno(), TX_FRAME * TX_FRAMES)
    lengths = struct.Struct("=II")
    request = TP_STATUS_SEND_REQUEST.to_bytes(4, "little")
    slot = cursor = 0
    print("ready", len(frames), flush=True)
    for line in sys.stdin:
        rate, seconds = float(line.split()[0]), float(line.split()[1])
        total, sent = int(rate * seconds), 0
        started = time.perf_counter()
        while sent < total:
            due = min(total, int((time.perf_counter() - started) * rate)) - sent
            if due <= 0:
                time.sleep(0.0002)
                continue
            first = slot
            for _ in range(min(due, TX_FRAMES)):
                frame = frames[cursor]
                cursor = (cursor + 1) % len(frames)
                at = slot * TX_FRAME
                ring[at + TX_DATA_AT : at + TX_DATA_AT + len(frame)] = frame
                lengths.pack_into(ring, at + 4, len(frame), len(frame))
                ring[at : at + 4] = request  # the status last: the kernel may take it now
                slot = (slot + 1) % TX_FRAMES
            sock.send(b"")  # blocking: returns when every requested frame has gone
            count = (slot - first) % TX_FRAMES or TX_FRAMES
            at = first
            for _ in range(count):  # each frame handed back as sent (status 0), or an error
                if ring[at * TX_FRAME : at * TX_FRAME + 4] != bytes(4):
                    raise RuntimeError("the kernel refused a replayed frame")
                at = (at + 1) % TX_FRAMES
            sent += count
        print(sent, time.perf_counter() - started, flush=True)
    ring.close()
    sock.close()
    return 0


class Replay:
    """A sender process for one recording; `send` replays it and says how much went out."""

    def __init__(self, bench: Bench, pcap: Path, to_client: bool = False) -> None:
        """`to_client`: frames the client's IP stack receives (nflog sees only those)."""
        self.bench = bench
        to = bench.client_mac if to_client else FOREIGN_MAC.hex()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", __file__, "--sender", bench.host_end, str(pcap), to],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError("the replay sender did not start")
        self.frames = int(ready[1])
        self.elapsed = 0.0  # how long the last replay took (longer than asked: sender-bound)

    def send(self, rate: int, seconds: float) -> int:
        """Replay at `rate` frames/s for `seconds`; the frames that reached the client."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        dropped = self._veth_drops()
        self.proc.stdin.write(f"{rate} {seconds}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        sent, self.elapsed = int(answer[0]), float(answer[1])
        lost = self._veth_drops() - dropped
        if lost:
            print(f"  (the veth itself dropped {lost} of {sent} frames)")
        return sent - lost

    def _veth_drops(self) -> int:
        path = Path(f"/sys/class/net/{self.bench.host_end}/statistics/tx_dropped")
        return int(path.read_text())

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


Capturer = Callable[[Replay, int, float], tuple[int, int]]


def depdrill_with(tap: TapChoice) -> Capturer:
    """depdrill's live capture through `tap`."""
    return lambda replay, rate, seconds: with_depdrill(replay, rate, seconds, tap)


def with_depdrill(replay: Replay, rate: int, seconds: float, tap: TapChoice) -> tuple[int, int]:
    bench = replay.bench
    options = DiscoverOptions(target=Target(netns=bench.client), duration_s=seconds + 60, tap=tap)
    stop, ready = threading.Event(), threading.Event()
    result: dict[str, int] = {}

    def capture() -> None:
        cpu = time.thread_time()
        graph = run(options, stop, ready)
        result["seen"] = graph.capture.dns_messages + graph.capture.malformed
        result["drops"] = graph.capture.kernel_drops
        assert graph.capture.tap == tap, graph.capture.tap_fallback
        result["cpu_ms"] = int((time.thread_time() - cpu) * 1000)

    thread = threading.Thread(target=capture)
    thread.start()
    ready.wait(10)
    sent = replay.send(rate, seconds)
    ended = time.perf_counter()
    time.sleep(0.3)
    stop.set()
    thread.join()
    print(f"  depdrill  capture thread CPU {result['cpu_ms'] / 1000:.1f} s (graph build included) "
          f"for {seconds:g} s of load, kernel drops {result['drops']}, done "
          f"{time.perf_counter() - ended:.1f} s after the load")  # fmt: skip
    return result["seen"], sent


def with_tcpdump(replay: Replay, rate: int, seconds: float) -> tuple[int, int]:
    bench = replay.bench
    with tempfile.NamedTemporaryFile(suffix=".pcap") as pcap:
        argv = bench.ns(bench.client, "tcpdump", "-i", "eth0", "-B", "32768", "-w", pcap.name,
                        "udp port 53")  # fmt: skip
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        while "listening on" not in proc.stderr.readline():
            pass
        time.sleep(1.0)  # "listening on" comes before the ring is fully set up
        sent = replay.send(rate, seconds)
        time.sleep(1.5)  # the ring hands a block to tcpdump when full or after 1 s
        proc.terminate()
        _, err = proc.communicate(10)
    captured = int(re.search(r"(\d+) packets captured", err).group(1))  # type: ignore[union-attr]
    return captured, sent


def with_scapy(replay: Replay, rate: int, seconds: float) -> tuple[int, int]:
    bench = replay.bench
    argv = bench.ns(bench.client, sys.executable, "-c", SCAPY_SNIFF)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.readline()
    time.sleep(0.3)
    sent = replay.send(rate, seconds)
    time.sleep(0.5)
    out, _ = proc.communicate("", 60)
    return int(out.split()[-1]), sent


def lossless_rate(
    name: str, capture: Capturer, replay: Replay, rates: list[int], seconds: float
) -> int:
    """The highest rate (DNS messages/s on the wire) captured with loss under LOSS_LIMIT."""
    best = 0
    for rate in rates:
        seen, sent = capture(replay, rate, seconds)
        loss = 1 - seen / sent if sent else 1.0
        wire_rate = int(sent / max(seconds, replay.elapsed))
        print(f"  {name:9} wire {wire_rate:>7} msg/s  seen {seen:>8}/{sent:<8} "
              f"loss {loss:7.3%}", flush=True)  # fmt: skip
        if loss > LOSS_LIMIT:
            break
        best = max(best, wire_rate)
    return best


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
    parser.add_argument("--seconds", type=float, default=3.0, help="per step")
    parser.add_argument(
        "--sender", nargs=3, metavar=("IFACE", "PCAP", "MAC"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.sender:
        return sender(*args.sender)
    if os.geteuid() != 0 or shutil.which("dnsperf") is None:
        print("bench/capture.py needs root and dnsperf (apt-get install dnsperf)")
        return 2
    seconds = 2.5 if args.quick else args.seconds
    rates = [50_000, 100_000, 150_000, 200_000] if args.quick else [
        50_000, 100_000, 150_000, 200_000, 250_000, 300_000, 400_000, 500_000]  # fmt: skip
    # The flood first: ru_maxrss is a peak, so nothing bigger may run before it.
    names = 100_000 if args.quick else 1_000_000
    grown, elapsed = flood_memory(names)
    with bench_world() as bench:
        names_pcap, distinct_pcap = bench.tmp / "names.pcap", bench.tmp / "distinct.pcap"
        recorded = record(bench, bench.queries, names_pcap, 40_000, ["-l", "3"])
        recorded_distinct = record(bench, bench.distinct, distinct_pcap, 40_000, ["-n", "1"])
        print(f"recorded dnsperf -> dnsmasq: {recorded} messages on {NAMES} names, "
              f"{recorded_distinct} on {DISTINCT} distinct names; replayed at each rate for "
              f"{seconds:g} s, lossless means < {LOSS_LIMIT:.1%}")  # fmt: skip
        with Replay(bench, names_pcap) as replay:
            ebpf = lossless_rate("ebpf", depdrill_with("ebpf"), replay, rates, seconds)
            packet = lossless_rate("packet", depdrill_with("packet"), replay, rates, seconds)
            tcpdump = lossless_rate("tcpdump", with_tcpdump, replay, rates, seconds)
            scapy = lossless_rate(
                "scapy", with_scapy, replay, [1_000, 2_000, 4_000, 8_000, 16_000], seconds
            )
        with Replay(bench, distinct_pcap) as replay:
            ebpf_distinct = lossless_rate("ebpf*", depdrill_with("ebpf"), replay, rates, seconds)
            distinct = lossless_rate("packet*", depdrill_with("packet"), replay, rates, seconds)
        # The frames the client's stack receives: what an nflog capture can see at all.
        with Replay(bench, names_pcap, to_client=True) as replay:
            nflog = lossless_rate("nflog", depdrill_with("nflog"), replay, rates, seconds)
            received = lossless_rate("packet", depdrill_with("packet"), replay, rates, seconds)
        with Replay(bench, distinct_pcap, to_client=True) as replay:
            nflog_distinct = lossless_rate("nflog*", depdrill_with("nflog"), replay, rates, seconds)
    top = f"the ladder's top ({rates[-1]})"
    print(f"lossless DNS messages/s ({NAMES} names; * every message new): depdrill --tap ebpf "
          f"{ebpf}, ebpf* {ebpf_distinct}; --tap packet {packet}, packet* {distinct}; "
          f"tcpdump -w {tcpdump}; scapy sniff {scapy}; a figure at {top} or the sender's "
          "limit is a floor")  # fmt: skip
    print(f"frames the client receives: depdrill --tap nflog {nflog} ({NAMES} names), "
          f"{nflog_distinct} (every message new), --tap packet {received}")  # fmt: skip
    if received:
        print(f"nflog / packet on those frames: {nflog / received:.2f}")
    if tcpdump:
        print(
            f"ebpf / tcpdump -w: {ebpf / tcpdump:.2f}; packet / tcpdump -w: {packet / tcpdump:.2f}"
        )
    if scapy:
        print(f"ebpf / scapy sniff: {ebpf / scapy:.1f}")
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
