"""What the ebpf tap's programs cost the service's packets, measured in place: folding
repeated DNS exchanges in the kernel against copying every DNS packet to depdrill.

bench/overhead.py's service (an HTTP request, and a DNS lookup through dnsmasq, every
time) is loaded at its rate while the ebpf tap captures, opened one way or the other in
a fresh random order each cycle. The kernel times every run of the tap's programs
(BPF_ENABLE_STATS, held only while the bench runs), so what the tap adds to each packet's
path is read directly, not inferred from the service's latency, where on this VM it is
lost in the noise of scheduling. Printed per arm: ns per program run on ingress and
egress (the statistics' own two clock reads included alike) and ns per request; and the
fold/copy ratio of the ns per request with a 95 % bootstrap interval over cycles. What
folding saves depdrill's own CPU is bench/overhead.py's to print (`--taps
ebpf,ebpf-copy`): here the packets are read but not dissected.

Run as root, under the bench lock: `flock /tmp/depdrill-bench.lock .venv/bin/python -P
bench/progcost.py [--cycles N] [--seconds S] [--rate N]`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # bench/ is not a package
import overhead

from depdrill.bpf import run_statistics
from depdrill.discover.ebpf import EbpfCapture
from depdrill.netns import Target

ARMS = ("fold", "copy")


@dataclass
class Arm:
    ingress: list[float] = field(default_factory=list)  # ns a run, per cycle
    egress: list[float] = field(default_factory=list)
    per_request: list[float] = field(default_factory=list)


def one_round(
    service: str, address: str, fold: bool, rate: int, seconds: float
) -> tuple[float, float, float]:
    capture = EbpfCapture.open(Target(netns=service), fold=fold)
    capture.on_repeat = lambda repeat: None
    stop = threading.Event()
    reader = threading.Thread(target=lambda: deque(capture.frames(1e9, stop, True), 0))
    reader.start()
    try:
        before = capture.program_run_time()
        requests = len(overhead.load(address, rate, seconds))
        after = capture.program_run_time()
    finally:
        stop.set()
        reader.join()
        capture.close()
    runs = {way: (after[way][0] - before[way][0], after[way][1] - before[way][1]) for way in after}
    return (
        runs["ingress"][0] / max(runs["ingress"][1], 1),
        runs["egress"][0] / max(runs["egress"][1], 1),
        (runs["ingress"][0] + runs["egress"][0]) / max(requests, 1),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0, help="per round")
    parser.add_argument("--rate", type=int, default=overhead.RATE, help="requests/s")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/progcost.py needs root (network namespaces, BPF)")
        return 2
    arms = {name: Arm() for name in ARMS}
    rng = random.Random(0)
    statistics_fd = run_statistics()
    try:
        with overhead.world([]) as world:
            for _ in range(args.cycles):
                for name in rng.sample(ARMS, len(ARMS)):
                    ingress, egress, per_request = one_round(
                        world.service, world.addresses[0], name == "fold", args.rate, args.seconds
                    )
                    arm = arms[name]
                    arm.ingress.append(ingress)
                    arm.egress.append(egress)
                    arm.per_request.append(per_request)
    finally:
        os.close(statistics_fd)
    print(
        f"{args.cycles} cycles of {len(ARMS)} {args.seconds} s rounds at {args.rate} requests/s "
        "(a DNS lookup in each), arms in random order"
    )
    for name, arm in arms.items():
        print(
            f"{name}: ingress {statistics.median(arm.ingress):.0f} ns a run, egress "
            f"{statistics.median(arm.egress):.0f} ns a run, "
            f"{statistics.median(arm.per_request):.0f} ns a request"
        )
    fold, copy = arms["fold"].per_request, arms["copy"].per_request
    ratio = statistics.mean(fold) / statistics.mean(copy)
    resampled = []
    for _ in range(args.resamples):
        picks = [rng.randrange(args.cycles) for _ in range(args.cycles)]
        resampled.append(
            statistics.mean(fold[i] for i in picks) / statistics.mean(copy[i] for i in picks)
        )
    resampled.sort()
    low, high = resampled[int(0.025 * args.resamples)], resampled[int(0.975 * args.resamples) - 1]
    print(f"fold/copy, ns a request: {ratio:.3f}, 95 % interval [{low:.3f}, {high:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
