"""Audit wall time on the lab: early stop (the default) against fixed 60 s windows, one run.

Builds a throwaway lab, discovers it and generates its suite once, then runs that same suite
twice: with the default settings (each observation stops once its verdict is certain, each
recovery once the SLO holds again) and with fixed 60 s observation windows and early stop
off (what a fixed-window tool does). Prints each test's verdict and time in both runs, the
wall times and their ratio. Target (issue 6): same verdicts, >= 10x faster.

The fixed run takes about 80 s a test; --only limits both runs to some tests (globs on test
ids, as `depdrill run --only`):

    python -P bench/audit_time.py [--only 'blackhole:*'] [--window 60] [--default-only]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from depdrill.audit import drive_traffic, wait_healthy
from depdrill.discover import run as discover_run
from depdrill.discover.tls import check as tls_check
from depdrill.execute import runner
from depdrill.execute.model import Results, TestResult
from depdrill.generate import planner
from depdrill.generate.model import Suite
from depdrill.lab.testing import lab_session
from depdrill.lab.truth import TRUTH
from depdrill.netns import Target

DISCOVER_S = 8.0


def generate(state_netns: str, probe_url: str, ca_bundle: str) -> Suite:
    target = Target(netns=state_netns)
    stop, ready = threading.Event(), threading.Event()
    driver = threading.Thread(target=drive_traffic, args=(probe_url, stop, ready), daemon=True)
    driver.start()
    try:
        graph = discover_run.run(
            discover_run.DiscoverOptions(target=target, duration_s=DISCOVER_S), ready=ready
        )
    finally:
        stop.set()
        driver.join()
    graph = tls_check.check_graph(
        graph, ca_bundle=Path(ca_bundle), warn_days=30, timeout_s=5.0, target=target
    )
    options = planner.options_from_cli(
        probes=[probe_url],
        service_name="lab demo service",
        latency="100ms,1000ms",
        ca_bundle=ca_bundle,
        target=target,
        slo=TRUTH.slo,
        timing=TRUTH.timing,
    )
    return planner.run(graph, options)


def timed_run(suite: Suite, only: list[str], early_stop: bool) -> tuple[float, Results]:
    began = time.monotonic()
    results = runner.run(
        suite,
        runner.RunOptions(only=only, early_stop=early_stop, check_chain=tls_check.check_endpoint),
    )
    return time.monotonic() - began, results


def seconds(test: TestResult) -> float:
    return (test.ended - test.started).total_seconds()


def report_against_truth(results: Results) -> int:
    same = True
    for test in results.tests:
        truth = TRUTH.verdicts.get(test.id)
        agree = truth is None or test.verdict == truth
        same &= agree
        print(
            f"{test.id:48} {test.verdict.value:>12} {seconds(test):6.1f}  "
            f"{truth.value if truth else '-'}{'' if agree else '  DIFFERENT: ' + test.rule}"
        )
    print(f"verdicts match the lab's truth: {'yes' if same else 'NO'}")
    return 0 if same else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="test id glob (repeatable)")
    parser.add_argument("--window", type=float, default=60.0, help="fixed observation, s")
    parser.add_argument(
        "--default-only",
        action="store_true",
        help="skip the fixed-window run; compare the default run's verdicts with the lab's truth",
    )
    args = parser.parse_args()
    with lab_session() as state:
        probe = TRUTH.probe_for(state)
        wait_healthy(probe)
        suite = generate(state.service_netns, probe.url, state.ca_bundle)
        selected = runner.select(suite.tests, args.only)
        print(f"lab {state.prefix}: {len(suite.tests)} tests, running {len(selected)}:")
        print("  " + ", ".join(t.id for t in selected), flush=True)
        fast_s, fast = timed_run(suite, args.only, early_stop=True)
        print(f"default (early stop): {fast_s:.1f} s", flush=True)
        if args.default_only:
            return report_against_truth(fast)
        timing = suite.defaults.timing.model_copy(
            update={
                "observe_s": args.window,
                "max_fault_s": max(suite.defaults.timing.max_fault_s, args.window + 30),
            }
        )
        fixed_suite = suite.model_copy(
            update={"defaults": suite.defaults.model_copy(update={"timing": timing})}
        )
        fixed_s, fixed = timed_run(fixed_suite, args.only, early_stop=False)
        print(f"fixed {args.window:.0f} s windows: {fixed_s:.1f} s", flush=True)
    fixed_by_id = {t.id: t for t in fixed.tests}
    same = True
    print(f"{'test':48} {'default':>12} {'s':>6}   {'fixed':>12} {'s':>6}  truth")
    for test in fast.tests:
        other = fixed_by_id[test.id]
        truth = TRUTH.verdicts.get(test.id)
        agree = test.verdict == other.verdict
        same &= agree
        print(
            f"{test.id:48} {test.verdict.value:>12} {seconds(test):6.1f}   "
            f"{other.verdict.value:>12} {seconds(other):6.1f}  "
            f"{truth.value if truth else '-'}{'' if agree else '  DIFFERENT'}"
        )
        if not agree:
            print(f"    default: {test.rule}\n    fixed:   {other.rule}")
    ratio = fixed_s / fast_s
    print(f"wall time: default {fast_s:.1f} s, fixed windows {fixed_s:.1f} s, ratio {ratio:.1f}x")
    met = "met" if ratio >= 10 else "MISSED"
    print(f"same verdicts: {'yes' if same else 'NO'}; target >= 10x: {met}")
    return 0 if same and ratio >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
