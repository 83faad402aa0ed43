"""Apply and revert time per fault: depdrill's in-process netlink against the CLIs, one run.

A blackhole through libnftables (a context this process keeps) against the same ruleset
loaded with `nft -f` and removed with `nft delete table`; a latency fault (NFQUEUE: the
gate and queue tables, and the queue handed to a release process started at preflight).
Prints medians and ratios.
Target (issue 6): <= 2 ms each way in-process.

    python -P bench/faults.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from depdrill.artifact import utcnow
from depdrill.execute.injectors.base import FaultContext
from depdrill.execute.injectors.nfqueue_latency import GATE_MARK, NfqueueLatency
from depdrill.execute.injectors.nft_blackhole import NftBlackhole
from depdrill.generate.model import BlackholeFault, LatencyFault
from depdrill.netns import Target

DEPENDENCY = "198.19.254.3"
# Between a test's preflight and its apply the runner measures the baseline (seconds); the
# bench waits a little too, so the previous fault's release process has left meanwhile.
BASELINE_S = 0.2


def sh(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, check=True, capture_output=True, text=True)


@contextmanager
def namespace() -> Iterator[Target]:
    name = f"ddtbench{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        sh("ip", "-n", name, "addr", "add", "198.19.254.2/24", "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", name, "link", "set", "eth1", "up")
        yield Target(netns=name)
    finally:
        sh("ip", "netns", "del", name)


def timed(action: Callable[[], object]) -> tuple[float, object]:
    began = time.perf_counter()
    result = action()
    return (time.perf_counter() - began) * 1000, result


def median(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} ms (p90 {sorted(values)[len(values) * 9 // 10]:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    rounds = parser.parse_args().rounds
    with namespace() as target:
        ctx = FaultContext(
            target=target,
            run_id="bench",
            test_id="bench",
            deadline=utcnow() + timedelta(minutes=10),
        )
        blackhole = NftBlackhole()
        fault = BlackholeFault(addresses=[DEPENDENCY])
        prefix = target.exec_prefix()
        nft_apply, nft_revert, cli_apply, cli_revert, spawn = [], [], [], [], []
        for _ in range(rounds):
            plan = blackhole.plan(fault, ctx)
            ms, handle = timed(lambda p=plan: blackhole.apply_plan(p))  # type: ignore[misc]
            nft_apply.append(ms)
            nft_revert.append(timed(lambda h=handle: blackhole.revert(h))[0])  # type: ignore[misc]
            # The same ruleset through the CLI, minus the owner flag (the CLI exits at once,
            # and an owner table would leave with it).
            text = plan.rules[0].replace("\tflags owner;\n", "")
            table = plan.objects[0].name
            cli_apply.append(timed(lambda t=text: sh(*prefix, "nft", "-f", "-", stdin=t))[0])  # type: ignore[misc]
            cli_revert.append(
                timed(lambda n=table: sh(*prefix, "nft", "delete", "table", "netdev", n))[0]  # type: ignore[misc]
            )
            # What entering the namespace costs the CLI (nsenter), to report the CLI net of it.
            spawn.append(timed(lambda: sh(*prefix, "true"))[0])
        latency = NfqueueLatency()
        lat_fault = LatencyFault(addresses=[DEPENDENCY], delay_ms=100)
        nfq_preflight, nfq_apply, nfq_revert = [], [], []
        lat_cli_apply: list[float] = []
        lat_cli_revert: list[float] = []
        for _ in range(max(5, rounds // 3)):
            # As the runner does: preflight (before the baseline) starts the release process.
            nfq_preflight.append(timed(lambda: latency.preflight(lat_fault, ctx))[0])
            time.sleep(BASELINE_S)
            lat_plan = latency.plan(lat_fault, ctx)
            ms, handle = timed(lambda p=lat_plan: latency.apply_plan(p))  # type: ignore[misc]
            nfq_apply.append(ms)
            nfq_revert.append(timed(lambda h=handle: latency.revert(h))[0])  # type: ignore[misc]
            # The CLI way to the same rules: the gate with `nft -f` and the queue rule with
            # iptables (nft's own `queue` is compiled out here). No queue reader is bound:
            # the CLI side only installs and removes rules, which favours it.
            gate = lat_plan.rules[0].replace("\tflags owner;\n", "")
            queue = lat_plan.rules[1].split("queue num ")[1].split()[0]
            rule = ["INPUT", "-m", "mark", "--mark", f"0x{GATE_MARK:x}/0x{GATE_MARK:x}"]
            rule += ["-j", "NFQUEUE", "--queue-num", queue, "--queue-bypass"]
            gate_table = lat_plan.objects[0].name
            lat_cli_apply.append(
                timed(
                    lambda g=gate, r=rule: (  # type: ignore[misc]
                        sh(*prefix, "nft", "-f", "-", stdin=g),
                        sh(*prefix, "iptables-legacy", "-t", "mangle", "-I", *r),
                    )
                )[0]
            )
            lat_cli_revert.append(
                timed(
                    lambda n=gate_table, r=rule: (  # type: ignore[misc]
                        sh(*prefix, "iptables-legacy", "-t", "mangle", "-D", *r),
                        sh(*prefix, "nft", "delete", "table", "inet", n),
                    )
                )[0]
            )
    print(f"nft-blackhole apply, in-process libnftables : {median(nft_apply)}")
    print(f"nft-blackhole apply, nft -f CLI             : {median(cli_apply)}")
    print(f"nft-blackhole revert, in-process            : {median(nft_revert)}")
    print(f"nft-blackhole revert, nft delete table CLI  : {median(cli_revert)}")
    entering = statistics.median(spawn)
    print(f"  (of which entering the namespace, nsenter true: {entering:.3f} ms)")
    for what, cli, ours in (("apply ", cli_apply, nft_apply), ("revert", cli_revert, nft_revert)):
        raw = statistics.median(cli) / statistics.median(ours)
        net = (statistics.median(cli) - entering) / statistics.median(ours)
        print(f"ratio CLI/in-process, {what}: {raw:6.1f}x ({net:.1f}x net of nsenter)")
    print(f"nfqueue-latency preflight (starts the release process) : {median(nfq_preflight)}")
    print(f"nfqueue-latency apply (gate + queue tables + queue)     : {median(nfq_apply)}")
    print(f"nfqueue-latency revert                                  : {median(nfq_revert)}")
    print(f"the same rules by CLI, apply (nft -f + iptables-legacy)  : {median(lat_cli_apply)}")
    print(f"the same rules by CLI, revert                           : {median(lat_cli_revert)}")
    for what, cli, ours in (
        ("apply ", lat_cli_apply, nfq_apply),
        ("revert", lat_cli_revert, nfq_revert),
    ):
        ratio = statistics.median(cli) / statistics.median(ours)
        print(f"ratio CLI/in-process, latency {what}: {ratio:6.1f}x")
    ok = all(
        statistics.median(times) <= 2 for times in (nft_apply, nft_revert, nfq_apply, nfq_revert)
    )
    print(f"target <= 2 ms each way in-process: {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
