"""Hold each packet of an NFQUEUE queue for a fixed delay, then accept it (a test's latency).

Run inside a namespace: `python -P nfqueue_delay.py SECONDS QUEUE`. Prints `ready` once bound.
"""

from __future__ import annotations

import heapq
import itertools
import select
import sys
import time
from typing import Any

from netfilterqueue import NetfilterQueue


def main() -> None:
    delay, queue = float(sys.argv[1]), int(sys.argv[2])
    held: list[tuple[float, int, Any]] = []
    order = itertools.count()

    def hold(packet: Any) -> None:
        heapq.heappush(held, (time.monotonic() + delay, next(order), packet))

    nfq = NetfilterQueue()
    nfq.bind(queue, hold)
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            heapq.heappop(held)[2].accept()
        wait = held[0][0] - now if held else 1.0
        readable, _, _ = select.select([nfq.get_fd()], [], [], max(0.0, wait))
        if readable:
            nfq.run(block=False)


if __name__ == "__main__":
    main()
