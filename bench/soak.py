"""Memory over a continuous-capture soak: the daemon's discovery against the lab, RSS at
start and end, printed as a ratio (flat is ~1.0).

A Watch captures the lab's service in short windows while the service is driven and also
looks up a stream of fresh random names; a snapshot every `--period` seconds plays the
scheduled scan's part, so each period's graph is built, taken and dropped as in the daemon.

Run as root: `.venv/bin/python -P bench/soak.py [--duration 1800] [--period 30]`.
"""

from __future__ import annotations

import argparse
import gc
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from depdrill.daemon.config import DaemonSettings, ServiceConfig
from depdrill.daemon.watch import Watch
from depdrill.lab.testing import lab_session


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def fresh_names(netns: str, resolver: str, stop: threading.Event) -> None:
    """A new name every 0.1 s from inside the service: the graph has new nodes to hold."""
    while not stop.is_set():
        name = f"soak-{secrets.token_hex(4)}.lab.test"
        argv = ["ip", "netns", "exec", netns, "dig", "+tries=1", "+time=1", f"@{resolver}", name]
        subprocess.run(argv, capture_output=True, timeout=10)
        stop.wait(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--period", type=float, default=10.0, help="seconds between snapshots")
    parser.add_argument("--window", type=float, default=2.0, help="capture window, seconds")
    args = parser.parse_args()
    with lab_session() as lab:
        service = ServiceConfig.model_validate(
            {
                "name": "soak",
                "target": {"netns": lab.service_netns},
                "probes": [lab.service_url],
                "schedule": {"cron": "0 2 * * *"},
                "output_dir": "/nonexistent",
                "drive": True,
            }
        )
        watch = Watch(service, DaemonSettings(discovery_window_s=args.window, retry_s=0.5))
        stop = threading.Event()
        names = threading.Thread(
            target=fresh_names, args=(lab.service_netns, lab.resolver, stop), daemon=True
        )
        watch.start()
        names.start()
        try:
            # The first period: imports, caches and buffers settle before the baseline.
            time.sleep(min(args.period, args.duration / 4))
            watch.snapshot()
            gc.collect()
            samples = [rss_kib()]
            began = time.monotonic()
            periods, dependencies = 0, 0
            while time.monotonic() - began < args.duration:
                time.sleep(min(args.period, args.duration - (time.monotonic() - began)))
                graph = watch.snapshot()
                periods += 1
                found = len(graph.dependencies()) if graph is not None else 0
                dependencies += found
                elapsed = time.monotonic() - began
                samples.append(rss_kib())
                print(
                    f"  {elapsed:6.0f} s  RSS {samples[-1]} KiB  {found} dependencies", flush=True
                )
        finally:
            stop.set()
            names.join()
            watch.stop()
    print(
        f"soak {args.duration:.0f} s, {watch.windows} capture windows, {periods} snapshots, "
        f"{dependencies} dependencies seen, {watch.kernel_drops} kernel drops"
    )
    # A capture window's packet ring counts in RSS while the kernel fills it, so one sample
    # can sit ~30 MiB high: compare medians of the first and last three samples.
    start_rss, end_rss = statistics.median(samples[:3]), statistics.median(samples[-3:])
    print(
        f"RSS start {start_rss:.0f} KiB, end {end_rss:.0f} KiB (medians of 3 samples), "
        f"peak {max(samples)} KiB, end/start {end_rss / start_rss:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
