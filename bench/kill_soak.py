"""SIGKILL soak: a runner holding faults is killed at random moments, 100 times.

Each round starts tests/execute/fault_holder.py (a real FaultSession with its watchdog,
holding a blackhole on the dependency's port 7001 and NFQUEUE latency on 7002, or
cycling through apply/revert so that a kill lands anywhere), SIGKILLs it after a random
0-250 ms, and polls until nothing is left: no depdrill nft table (so no set element), no
tagged iptables rule, no qdisc of depdrill's, no NFQUEUE queue of depdrill's bound, no
journal; then both ports must answer at once. Target (issue 6): within 2 s, every time.
Prints the recovery times (worst, p50, p90); a poll round costs ~30 ms of CLI calls, so
that is their resolution.

    python -P bench/kill_soak.py [--kills 100]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from depdrill.execute.injectors.nfqueue_latency import QUEUE_BASE, QUEUE_SPAN
from depdrill.netns import Target, entered
from depdrill.testing import RUN, ScratchNet, scratch_bridge, sh

HOLDER = Path(__file__).resolve().parent.parent / "tests" / "execute" / "fault_holder.py"
PORTS = (7001, 7002)
LIMIT_S = 2.0


@contextmanager
def world() -> Iterator[tuple[ScratchNet, str, str]]:
    """A service and a dependency that accepts on both ports; torn down afterwards."""
    stop = threading.Event()
    listeners: list[socket.socket] = []
    server: threading.Thread | None = None
    with scratch_bridge(902, f"ddt{RUN}bk") as net:
        try:
            service, dependency = net.add("s", 2), net.add("d", 3)
            with entered(Target(netns=dependency)):
                for port in PORTS:
                    listener = socket.socket()
                    listeners.append(listener)
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind((net.address(3), port))
                    listener.listen(128)
            server = threading.Thread(target=accept_all, args=(listeners, stop), daemon=True)
            server.start()
            yield net, service, net.address(3)
        finally:
            stop.set()
            if server is not None:
                server.join()
            for listener in listeners:
                listener.close()


def accept_all(listeners: list[socket.socket], stop: threading.Event) -> None:
    with selectors.DefaultSelector() as selector:
        for listener in listeners:
            selector.register(listener, selectors.EVENT_READ)
        while not stop.is_set():
            for key, _ in selector.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with contextlib.suppress(OSError):
                    sock.accept()[0].close()


def connect_ms(service: str, address: str, port: int) -> float | None:
    with entered(Target(netns=service)):
        sock = socket.socket()
    with sock:
        sock.settimeout(1.0)
        began = time.perf_counter()
        try:
            sock.connect((address, port))
        except OSError:
            return None
        return (time.perf_counter() - began) * 1000


def leftovers(service: str, journal_dir: Path) -> list[str]:
    """What of depdrill is still in the service's namespace (empty: nothing)."""
    found: list[str] = []
    exec_ = ("ip", "netns", "exec", service)
    if "depdrill" in sh(*exec_, "nft", "list", "ruleset", check=False).stdout:
        found.append("nft table")
    for binary in ("iptables-legacy-save", "ip6tables-legacy-save"):
        if "depdrill" in sh(*exec_, binary, check=False).stdout:
            found.append(f"{binary} rule")
    if re.search(r"qdisc \S+ dd[0-9a-f]{2}:", sh("tc", "-n", service, "qdisc", check=False).stdout):
        found.append("qdisc")
    queues = sh(*exec_, "cat", "/proc/net/netfilter/nfnetlink_queue", check=False).stdout
    for line in queues.splitlines():
        fields = line.split()
        if fields and QUEUE_BASE <= int(fields[0]) < QUEUE_BASE + QUEUE_SPAN:
            found.append(f"queue {fields[0]}")
    if any(journal_dir.iterdir()):
        found.append("journal")
    return found


def kill_once(service: str, address: str, journal_dir: Path, run_id: str, mode: str) -> float:
    """Start a holder, SIGKILL it at a random moment; seconds until nothing is left."""
    child = subprocess.Popen(
        [sys.executable, "-P", str(HOLDER), service, address, str(journal_dir), run_id, mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    with child.stdout:
        if child.stdout.readline().strip() != "on":
            child.kill()
            child.wait()
            raise RuntimeError(f"the fault holder {run_id} never put its faults on")
    time.sleep(random.uniform(0, 0.25))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed = time.monotonic()
    while leftovers(service, journal_dir) and time.monotonic() - killed < LIMIT_S * 2:
        time.sleep(0.01)
    return time.monotonic() - killed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    args = parser.parse_args()
    times: list[float] = []
    failures: list[str] = []
    with world() as (_, service, address), tempfile.TemporaryDirectory() as tmp:
        journal_dir = Path(tmp)
        for n in range(args.kills):
            mode = "cycle" if n % 2 else "both"
            took = kill_once(service, address, journal_dir, f"soak{n}", mode)
            times.append(took)
            left = leftovers(service, journal_dir)
            answers = {port: connect_ms(service, address, port) for port in PORTS}
            slow = {port: ms for port, ms in answers.items() if ms is None or ms > 20}
            if took >= LIMIT_S or left or slow:
                failures.append(f"kill {n} ({mode}): {took:.3f} s, left {left}, slow {slow}")
            if (n + 1) % 10 == 0:
                print(f"{n + 1:4d} kills, worst so far {max(times) * 1000:.0f} ms", flush=True)
    ordered = sorted(times)
    print(
        f"{len(times)} SIGKILLs: recovery worst {ordered[-1] * 1000:.0f} ms, "
        f"p50 {statistics.median(ordered) * 1000:.0f} ms, "
        f"p90 {ordered[len(ordered) * 9 // 10] * 1000:.0f} ms (limit {LIMIT_S * 1000:.0f} ms)"
    )
    for failure in failures:
        print("FAILED", failure)
    print(f"target: nothing left and traffic flowing within 2 s: {'MISSED' if failures else 'met'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
