"""What a packet tap in the service's namespace costs the service, per packet and why.

A service (a namespace on a bridge, as a container sits on docker0) answers a client (a
second namespace) five ways: `udp` ping-pong (its replies are UDP it sends, so they pass
discovery's filter and are copied to the ring), `dns` the same on port 53 (both ways kept
by discovery, every packet), `rr` request-response on one TCP
connection (data segments: the filter refuses every one), `crr` a connection per request
(the HTTP shape of bench/overhead.py: SYN, data, FIN both ways) and `lo` request-response
over loopback inside the service's namespace (a sidecar, a local cache: nothing discovery
wants). Client and service share one CPU (taskset), so a round trip is a plain sum of CPU
work, free of cross-CPU wake-ups, which on this VM dwarf a tap's cost (a 15 µs round trip
becomes 48 µs when the two sides sit on different CPUs).

Between short rounds the bench puts taps in front of the service, every arm once per
cycle in a fresh random order so drift and other load hit each alike, and prints each
arm's round-trip p50/p99 pooled over the run against no tap at all, with the packets a
transaction puts through the service's interfaces, to read a cost per packet:

- `off`: no packet socket;
- `reject`: an ETH_P_ALL socket whose filter is `ret #0`: the tap's hook alone (and, on
  transmit, dev_queue_xmit_nit's clone of the outgoing skb), the filter costing nothing;
- `earlier`: the filter as it was before bench/tapcost.py (libpcap order: the openings
  tests, payload bytes included, before the source address), no ring;
- `filter`: today's filter (bpf_filter), no ring;
- `ring`: today's filter with discovery's TPACKET_V3 ring (never read here);
- `ring-in`: the ring with PACKET_IGNORE_OUTGOING: sees only what arrives (incomplete),
  so `ring` minus `ring-in` prices everything the transmit side costs, clone included;
- `peer`: the capture split so no skb is ever cloned: a socket ignoring outgoing packets
  in the namespace, and one on the host end of the service's veth, where what the
  service sends arrives, ignoring outgoing packets too;
- `live`: LiveCapture.open as discovery runs it (bound to eth0, the namespace's only
  interface, so loopback traffic never meets the tap);
- `nflog`: no tap, but discovery's other capture as it runs (NflogCapture.open, never
  read here): an nft table whose rules log DNS, the service's UDP, its SYNs and its
  ClientHellos to an NFLOG group bound by depdrill, so every other packet of the service
  meets a few rule tests, and nothing more;
- `ebpf`: discovery's default capture as it runs (EbpfCapture.open with folding, read in
  a background thread as discovery reads it, so a kept packet's copy is a copy and not a
  counted drop): a tcx program on eth0's ingress and egress that reads the headers and
  copies what discovery keeps into a BPF ring (the workloads here serve DNS, they do not
  ask it, so folding's path is bench/progcost.py's to price);
- `tcx`: an empty tcx program (it returns at once) on eth0's ingress and egress: the
  hook's own cost, under `ebpf`'s;
- `tstamp`: no tap, but a socket with SO_TIMESTAMP open on the host, which switches on
  the kernel's receive timestamps (netstamp_needed_key) for every packet.

Run as root: `flock /tmp/depdrill-bench.lock .venv/bin/python -P bench/tapcost.py
[--cycles N] [--kinds udp,rr,crr,dns,lo] [--arms live,nflog,ebpf,tcx]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack

from depdrill.bpf import R0, TCX_NEXT, Asm, attach_tcx, load_program
from depdrill.discover.capture import (
    ETH_P_ALL,
    SOL_PACKET,
    LiveCapture,
    _Ring,
    attach_bpf,
    bpf_filter,
    compile_bpf,
)
from depdrill.discover.ebpf import EbpfCapture
from depdrill.discover.nflog import NflogCapture
from depdrill.netns import Target, entered
from depdrill.testing import RUN, ScratchNet, scratch_bridge

SO_TIMESTAMP = 29
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20+: the tap skips outgoing packets before any clone
PORTS = {"udp": 9000, "rr": 9001, "crr": 9002, "dns": 53}
# Transactions per round: a round lasts 15-25 ms, short enough that the box's slow drifts
# hit every arm alike within a cycle.
ROUND = {"udp": 1000, "rr": 1000, "crr": 250, "lo": 1000, "dns": 1000}
KINDS = tuple(ROUND)

SERVER = """
import os, socket
def listener(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(512); return s
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", {udp}))
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); dns.bind(("0.0.0.0", {dns}))
rr, crr = listener({rr}), listener({crr})
print("ready", flush=True)
for echo in (udp, dns):
    if os.fork() == 0:
        while True:
            data, peer = echo.recvfrom(2048); echo.sendto(data, peer)
if os.fork() == 0:
    while True:
        conn, _ = rr.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if os.fork() == 0:  # one process per connection: the remote and the local client
            while data := conn.recv(4096): conn.sendall(data)
            os._exit(0)
        conn.close()
while True:
    conn, _ = crr.accept(); conn.recv(4096); conn.sendall(b"x" * 100); conn.close()
""".format(**PORTS)

# Reads "kind count" lines, answers with the round trips in ns, one line per round.
CLIENT = """
import socket, sys, time
server = sys.argv[1]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.connect((server, {udp}))
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); dns.connect((server, {dns}))
rr = socket.create_connection((server, {rr}))
rr.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
clock = time.perf_counter_ns
print("ready", flush=True)
for line in sys.stdin:
    kind, count = line.split(); out = []
    for _ in range(int(count)):
        t = clock()
        if kind == "udp":
            udp.send(b"p" * 64); udp.recv(2048)
        elif kind == "dns":
            dns.send(b"p" * 64); dns.recv(2048)
        elif kind == "rr":
            rr.sendall(b"p" * 64); rr.recv(4096)
        else:
            c = socket.create_connection((server, {crr}))
            c.sendall(b"GET /"); c.recv(4096); c.close()
        out.append(clock() - t)
    print(" ".join(map(str, out)), flush=True)
""".format(**PORTS)

Arm = Callable[[ExitStack], None]
REJECT_ALL = (6).to_bytes(2, "little") + bytes(6)  # ret #0
EARLIER_FILTER = (
    "udp port 53 or tcp port 53 or (((ip and tcp[tcpflags] & (tcp-syn|tcp-ack) = tcp-syn)"
    " or (ip and tcp and tcp[((tcp[12] & 0xf0) >> 2)] = 0x16"
    " and tcp[((tcp[12] & 0xf0) >> 2) + 5] = 1)"
    " or (ip6 and ip6[6] = 6 and ip6[53] & 0x12 = 0x02)"
    " or (ip6 and ip6[6] = 6 and ip6[40 + ((ip6[52] & 0xf0) >> 2)] = 0x16"
    " and ip6[45 + ((ip6[52] & 0xf0) >> 2)] = 1) or udp) and (src host {}))"
)


def packet_socket(
    stack: ExitStack, program: bytes, *, ring: bool, ignore_out: bool = False, device: str = ""
) -> None:
    """An ETH_P_ALL cooked socket in the current namespace, filtered as asked."""
    sock = stack.enter_context(
        socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    )
    if ignore_out:
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    attach_bpf(sock, program)
    if device:
        sock.bind((device, ETH_P_ALL))
    if ring:
        stack.callback(_Ring(sock).close)


def arms(net: ScratchNet, service: str) -> dict[str, Arm]:
    """Each arm opens its taps into the stack it is given; closing the stack removes them."""
    target = Target(netns=service)
    today = compile_bpf(bpf_filter([net.address(10)]))
    earlier = compile_bpf(EARLIER_FILTER.format(net.address(10)))

    def in_service(program: bytes, ring: bool, ignore_out: bool = False) -> Arm:
        def open_taps(stack: ExitStack) -> None:
            with entered(target):
                packet_socket(stack, program, ring=ring, ignore_out=ignore_out)

        return open_taps

    def peer(stack: ExitStack) -> None:
        in_service(today, ring=True, ignore_out=True)(stack)
        packet_socket(stack, today, ring=True, ignore_out=True, device=net.links[0])

    def live(stack: ExitStack) -> None:
        stack.enter_context(LiveCapture.open(target))

    def nflog(stack: ExitStack) -> None:
        stack.enter_context(NflogCapture.open(target))

    def ebpf(stack: ExitStack) -> None:
        # Read as discovery reads it: a ring never drained would fill and turn each kept
        # packet's copy into a counted drop, which costs less.
        capture = stack.enter_context(EbpfCapture.open(target, fold=True))
        capture.on_repeat = lambda repeat: None
        stop = threading.Event()
        reader = threading.Thread(target=lambda: deque(capture.frames(1e9, stop, True), 0))
        reader.start()
        stack.callback(reader.join)
        stack.callback(stop.set)

    def tcx(stack: ExitStack) -> None:
        empty = Asm()
        empty.alu(R0, "=", TCX_NEXT)
        empty.exit()
        fd = load_program(empty.assemble(), "depdrill_bench")
        stack.callback(os.close, fd)
        with entered(target):
            for ingress in (True, False):
                stack.callback(os.close, attach_tcx(fd, socket.if_nametoindex("eth0"), ingress))

    def tstamp(stack: ExitStack) -> None:
        sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)

    return {
        "off": lambda stack: None,
        "reject": in_service(REJECT_ALL, ring=False),
        "earlier": in_service(earlier, ring=False),
        "filter": in_service(today, ring=False),
        "ring": in_service(today, ring=True),
        "ring-in": in_service(today, ring=True, ignore_out=True),
        "peer": peer,
        "live": live,
        "tstamp": tstamp,
        "nflog": nflog,
        "ebpf": ebpf,
        "tcx": tcx,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=40, help="rounds of every arm")
    parser.add_argument("--kinds", default=",".join(KINDS), help="workloads, comma-separated")
    parser.add_argument("--arms", default="", help="only these arms (and off), comma-separated")
    parser.add_argument("--cpu", default="1", help="the CPU client and service share")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/tapcost.py needs root (network namespaces)")
        return 2
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    with scratch_bridge(0, f"ddtc{RUN}") as net, ExitStack() as procs:
        service, client = net.add("svc", 10), net.add("cli", 20)
        table = arms(net, service)
        if args.arms:
            table = {a: table[a] for a in ["off", *args.arms.split(",")]}
        pin = ["ip", "netns", "exec"], ["taskset", "-c", args.cpu, sys.executable, "-c"]
        _start(procs, [*pin[0], service, *pin[1], SERVER])
        remote = _start(procs, [*pin[0], client, *pin[1], CLIENT, net.address(10)])
        local = _start(procs, [*pin[0], service, *pin[1], CLIENT, "127.0.0.1"])
        loaders = {kind: local if kind == "lo" else remote for kind in kinds}
        packets = {kind: _packets_per_transaction(service, kind, loaders[kind]) for kind in kinds}
        samples: dict[tuple[str, str], list[int]] = {(k, a): [] for k in kinds for a in table}
        started = time.monotonic()
        for _ in range(args.cycles):
            order = list(table)
            random.shuffle(order)
            for arm in order:
                with ExitStack() as taps:
                    table[arm](taps)
                    for kind, loader in loaders.items():
                        samples[kind, arm] += _round(loader, kind, ROUND[kind])
        elapsed = time.monotonic() - started
    print(f"{args.cycles} cycles of {len(table)} arms in random order, {elapsed:.0f} s")
    for kind in kinds:
        off = samples[kind, "off"]
        p50, p99 = _pct(off, 50), _pct(off, 99)
        print(
            f"{kind}: {len(off)} round trips per arm, {packets[kind]:.1f} packets in + out of "
            f"the interface each; off p50 {p50:.1f} µs, p99 {p99:.1f} µs"
        )
        for arm in table:
            if arm == "off":
                continue
            a50, a99 = _pct(samples[kind, arm], 50), _pct(samples[kind, arm], 99)
            per_packet = (a50 - p50) * 1000 / packets[kind]
            print(
                f"  {arm:8} p50 {a50:6.1f} µs (x{a50 / p50:.3f}, {a50 - p50:+4.1f} µs, "
                f"{per_packet:+4.0f} ns a packet)  p99 {a99:6.1f} µs (x{a99 / p99:.3f})"
            )
    return 0


def _packets_per_transaction(service: str, kind: str, loader: subprocess.Popen[str]) -> float:
    """Packets in and out of the interface the workload crosses, per transaction (warm-up)."""
    device = "lo" if kind == "lo" else "eth0"

    def counted() -> int:
        shown = subprocess.run(
            ["ip", "-n", service, "-j", "-s", "link", "show", device],
            capture_output=True,
            text=True,
            check=True,
        )
        stats = json.loads(shown.stdout)[0]["stats64"]
        return int(stats["rx"]["packets"]) + int(stats["tx"]["packets"])

    before = counted()
    _round(loader, kind, 3 * ROUND[kind])
    return (counted() - before) / (3 * ROUND[kind])


def _round(loader: subprocess.Popen[str], kind: str, count: int) -> list[int]:
    assert loader.stdin is not None and loader.stdout is not None
    loader.stdin.write(f"{'rr' if kind == 'lo' else kind} {count}\n")
    loader.stdin.flush()
    return [int(v) for v in loader.stdout.readline().split()]


def _pct(values: list[int], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] / 1000


def _start(procs: ExitStack, argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.callback(_stop, proc)
    assert proc.stdout is not None
    if "ready" not in proc.stdout.readline():
        raise RuntimeError(f"{argv[-3:]} did not start")
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # its forked children die with the namespace (ScratchNet.teardown)
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


if __name__ == "__main__":
    sys.exit(main())
