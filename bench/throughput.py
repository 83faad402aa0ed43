"""TCP bulk throughput under 100 ms of NFQUEUE delay: receive path, send path, and the bound.

The service uploads to its dependency (a sender process in the service namespace, a sink
in the dependency's), for a few seconds each: with no fault, with the delay on the
receive path (depdrill's default: the dependency's ACKs wait) and on the send path (the
service's own data segments wait). Throughput counts the second half of each transfer
only, after slow start and buffer autotuning. What the RTT allows is the window over the
RTT, the window being the smaller of the peer's advertised window and the sender's own
send buffer (`ss -tim` snd_wnd, tb and rtt of the connection, the largest seen in the
second half). On a stock host the send buffer (tcp_wmem's maximum) is the limit, and it
holds the segments' overhead too, so ~75% of it is payload in flight. Target (issue 6):
the receive path within 2x of that bound; the send path shows the collapse the receive
path avoids (its sink reads until the sender's backlog drains, ~30 s at that rate).

    python -P bench/throughput.py [--seconds 6] [--delay 100]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from depdrill.artifact import utcnow
from depdrill.execute.injectors.base import FaultContext
from depdrill.execute.injectors.nfqueue_latency import NfqueueLatency
from depdrill.generate.model import LatencyFault
from depdrill.netns import Target
from depdrill.testing import RUN, scratch_bridge, sh

PORT = 7031
CHUNK = 1 << 20


def sink(address: str, seconds: float) -> None:
    """Receive one connection; print its throughput over the transfer's second half."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((address, PORT))
        server.listen(1)
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            buffer = bytearray(CHUNK)
            start = time.monotonic()
            half = start + seconds / 2
            total = at_half = 0
            half_seen: float | None = None
            while n := conn.recv_into(buffer):
                total += n
                if half_seen is None and time.monotonic() >= half:
                    half_seen, at_half = time.monotonic(), total
            ended = time.monotonic()
    if half_seen is None:
        half_seen, at_half = start, 0
    mbit = (total - at_half) * 8 / (ended - half_seen) / 1e6
    print(json.dumps({"bytes": total, "mbit": mbit}), flush=True)


def send(address: str, seconds: float) -> None:
    with socket.create_connection((address, PORT)) as conn:
        data = b"\0" * CHUNK
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            conn.sendall(data)


@dataclass(frozen=True)
class Window:
    """One look at the connection: its RTT and how much it may and does have in flight."""

    rtt_ms: float
    window_bytes: int  # the smaller of the peer's advertised window and our send buffer
    in_flight_bytes: int


@dataclass(frozen=True)
class Transfer:
    mbit: float
    rtt_ms: float
    window_bytes: int
    in_flight_bytes: int

    @property
    def allowed_mbit(self) -> float:
        return self.window_bytes * 8 / (self.rtt_ms / 1000) / 1e6


def me(*args: str) -> list[str]:
    return [sys.executable, "-P", str(Path(__file__).resolve()), *args]


def watch(service: str, address: str, stop: threading.Event, seen: list[Window]) -> None:
    """`ss -tim` of the upload every 0.25 s: RTT, the peer's window, the send buffer, in flight."""
    while not stop.wait(0.25):
        out = sh(
            "ip", "netns", "exec", service, "ss", "-tinmH", "dst", address, f"dport = :{PORT}",
            check=False,
        ).stdout  # fmt: skip
        fields = {
            name: re.search(pattern, out)
            for name, pattern in (
                ("rtt", r"\brtt:([\d.]+)/"),
                ("window", r"\bsnd_wnd:(\d+)"),
                ("buffer", r"\btb(\d+)"),
                ("unacked", r"\bunacked:(\d+)"),
                ("mss", r"\bmss:(\d+)"),
            )
        }
        if all(fields.values()):
            value = {name: float(m.group(1)) for name, m in fields.items() if m is not None}
            seen.append(
                Window(
                    rtt_ms=value["rtt"],
                    window_bytes=int(min(value["window"], value["buffer"])),
                    in_flight_bytes=int(value["unacked"] * value["mss"]),
                )
            )


def transfer(service: str, dependency: str, address: str, seconds: float) -> Transfer:
    receiver = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            dependency,
            *me("--role", "sink", "--to", address, "--seconds", str(seconds)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    seen: list[Window] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(service, address, stop, seen), daemon=True)
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        watcher.start()
        sh(
            "ip",
            "netns",
            "exec",
            service,
            *me("--role", "send", "--to", address, "--seconds", str(seconds)),
        )
        stop.set()
        watcher.join()
        result = json.loads(receiver.stdout.readline())
        receiver.stdout.close()
        receiver.wait(10)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    # The bound in steady state: the largest window, at the RTT measured with it.
    late = seen[len(seen) // 2 :] or [Window(float("nan"), 0, 0)]
    widest = max(late, key=lambda w: w.window_bytes)
    in_flight = max(w.in_flight_bytes for w in late)
    return Transfer(result["mbit"], widest.rtt_ms, widest.window_bytes, in_flight)


def bench(seconds: float, delay_ms: int) -> bool:
    with scratch_bridge(901, f"ddt{RUN}bt") as net:
        service, dependency = net.add("s", 2), net.add("d", 3)
        address = net.address(3)
        sh("ip", "netns", "exec", service, "ping", "-c", "1", "-W", "1", address)
        injector = NfqueueLatency()
        target = Target(netns=service)
        base = transfer(service, dependency, address, seconds)
        print(f"no fault:            {base.mbit:10.1f} Mbit/s  (rtt {base.rtt_ms:.3f} ms)")
        runs: dict[str, Transfer] = {}
        for direction in ("receive", "send"):
            ctx = FaultContext(
                target=target,
                run_id="benchtp",
                test_id=direction,
                deadline=utcnow() + timedelta(seconds=seconds + 60),
            )
            fault = LatencyFault(
                addresses=[address], ports=[PORT], delay_ms=delay_ms, direction=direction
            )
            handle = injector.apply(fault, ctx)
            try:
                runs[direction] = transfer(service, dependency, address, seconds)
            finally:
                injector.revert(handle)
            got = runs[direction]
            print(
                f"{delay_ms} ms on {direction:7}:  {got.mbit:10.1f} Mbit/s  (rtt {got.rtt_ms:.1f}"
                f" ms, window {got.window_bytes / 1e6:.2f} MB: allows {got.allowed_mbit:.1f}"
                f" Mbit/s; most in flight {got.in_flight_bytes / 1e6:.2f} MB)",
                flush=True,
            )
    receive, send_path = runs["receive"], runs["send"]
    bound = receive.allowed_mbit
    print(f"receive path / window bound:   {receive.mbit / bound:8.3f}")
    print(f"send path / window bound:      {send_path.mbit / bound:8.3f}")
    print(f"receive path / send path:      {receive.mbit / max(send_path.mbit, 1e-9):8.1f}x")
    print(f"receive path / no fault:       {receive.mbit / base.mbit:8.4f}")
    met = receive.mbit * 2 >= bound
    print(f"target receive path within 2x of the window bound: {'met' if met else 'MISSED'}")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["bench", "sink", "send"], default="bench")
    parser.add_argument("--to", default="")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--delay", type=int, default=100)
    args = parser.parse_args()
    if args.role == "sink":
        sink(args.to, args.seconds)
        return 0
    if args.role == "send":
        send(args.to, args.seconds)
        return 0
    return 0 if bench(args.seconds, args.delay) else 1


if __name__ == "__main__":
    sys.exit(main())
