"""A process that holds faults until it is killed: the runner, as the SIGKILL tests see it.

    python -P fault_holder.py NETNS DEPENDENCY JOURNAL_DIR RUN_ID MODE
MODE: "both" (a blackhole and a latency fault on at once, then waits) or "cycle" (applies
and reverts faults in a loop, so that a kill lands at any moment). Prints "on" once the
first faults are on.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

from depdrill.artifact import utcnow
from depdrill.execute.injectors.base import FaultContext
from depdrill.execute.injectors.nfqueue_latency import NfqueueLatency
from depdrill.execute.injectors.nft_blackhole import NftBlackhole
from depdrill.execute.safety import FaultSession
from depdrill.generate.model import BlackholeFault, LatencyFault
from depdrill.netns import Target


def main() -> None:
    netns, dependency, journal_dir, run_id, mode = sys.argv[1:6]
    target = Target(netns=netns)
    ctx = FaultContext(
        target=target, run_id=run_id, test_id="kill", deadline=utcnow() + timedelta(seconds=60)
    )
    blackhole = BlackholeFault(addresses=[dependency], ports=[7001])
    latency = LatencyFault(addresses=[dependency], ports=[7002], delay_ms=200)
    with FaultSession(run_id, target, Path(journal_dir)) as session:
        held = [
            session.apply(NftBlackhole(), blackhole, ctx),
            session.apply(NfqueueLatency(), latency, ctx),
        ]
        print("on", flush=True)
        while True:
            if mode == "cycle":
                for handle in held:
                    session.revert(handle)
                held = [
                    session.apply(NftBlackhole(), blackhole, ctx),
                    session.apply(NfqueueLatency(), latency, ctx),
                ]
            time.sleep(0.01)


if __name__ == "__main__":
    main()
