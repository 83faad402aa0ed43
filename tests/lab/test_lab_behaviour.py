"""The ground truth holds in the lab: each fault, made here by hand, gives the verdict named.

The faults are minimal and independent of depdrill's injectors (an nft netdev drop, an
NFQUEUE delay), so a wrong truth and a wrong injector cannot hide each other.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from depdrill.execute.model import Verdict
from depdrill.lab.model import LabState
from depdrill.lab.testing import lab_session
from depdrill.lab.truth import TRUTH

DELAYER = Path(__file__).with_name("nfqueue_delay.py")
SAMPLES, SPACING_S = 4, 0.1
FAULT_TESTS = sorted(t for t in TRUTH.verdicts if not t.startswith("cert:"))


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    """Given a lab built once for this module; removed afterwards, pass or fail."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root for network namespaces")
    with lab_session() as state:
        yield state


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@contextmanager
def silenced(netns: str, address: str, port: int | None = None) -> Iterator[None]:
    """Drop every packet to and from `address` (port 53 only, if given) at eth0, silently."""
    table = f"ddt{secrets.token_hex(3)}"
    match_in = f"ip saddr {address}" + (f" udp sport {port}" if port else "")
    match_out = f"ip daddr {address}" + (f" udp dport {port}" if port else "")
    rules = (
        f"table netdev {table} {{\n"
        f" chain in {{ type filter hook ingress device eth0 priority 0; {match_in} drop; }}\n"
        f" chain out {{ type filter hook egress device eth0 priority 0; {match_out} drop; }}\n"
        "}\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True
    )
    try:
        yield
    finally:
        _sh("ip", "netns", "exec", netns, "nft", "delete", "table", "netdev", table)


@contextmanager
def delayed(netns: str, address: str, seconds: float) -> Iterator[None]:
    """Hold every TCP packet from `address` for `seconds` before the service sees it."""
    queue = str(100 + secrets.randbelow(1000))
    rule = ["INPUT", "-s", address, "-p", "tcp", "-m", "comment", "--comment", "ddt-lab-test",
            "-j", "NFQUEUE", "--queue-num", queue]  # fmt: skip
    delayer = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-P", str(DELAYER), str(seconds), queue],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert delayer.stdout is not None and delayer.stdout.readline().strip() == "ready"
        _sh("ip", "netns", "exec", netns, "iptables-legacy", "-I", *rule)
        try:
            yield
        finally:
            _sh("ip", "netns", "exec", netns, "iptables-legacy", "-D", *rule)
    finally:
        delayer.kill()
        delayer.wait()
        if delayer.stdout is not None:
            delayer.stdout.close()


def sample(url: str) -> list[float | None]:
    """Probe in overlapping requests (a hung one does not delay the next): latency or None."""
    results: list[float | None] = [None] * SAMPLES

    def one(i: int) -> None:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=TRUTH.probe_timeout_s) as answer:
                answer.read()
                if answer.status == 200:
                    results[i] = time.monotonic() - started
        except (OSError, urllib.error.URLError):
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(SAMPLES)]
    for thread in threads:
        thread.start()
        time.sleep(SPACING_S)
    for thread in threads:
        thread.join()
    return results


def verdict_of(samples: list[float | None]) -> tuple[Verdict, float]:
    """The verdict the lab's SLO gives these samples, and their worst answered latency."""
    answered = [s for s in samples if s is not None]
    ratio = len(answered) / len(samples)
    worst_ms = max(answered, default=float("inf")) * 1000
    if ratio < TRUTH.slo.down_ratio:
        return Verdict.FAILED, worst_ms
    if ratio < TRUTH.slo.success_ratio or worst_ms > TRUTH.slo.p95_ms:
        return Verdict.DEGRADED, worst_ms
    return Verdict.TOLERANT, worst_ms


@contextmanager
def fault(lab: LabState, test_id: str) -> Iterator[None]:
    kind, _, name = test_id.partition(":")
    if kind == "dns":
        with silenced(lab.service_netns, lab.resolver, port=53):
            yield
        return
    dep = next(d for d in lab.dependencies if d.name == name)
    if kind == "blackhole":
        with silenced(lab.service_netns, dep.address):
            yield
        return
    step_ms = int(kind.removeprefix("latency-").removesuffix("ms"))
    with delayed(lab.service_netns, dep.address, step_ms / 1000):
        yield


def healthy_within(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                answer.read()
                return True
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    return False


@pytest.mark.parametrize("test_id", FAULT_TESTS)
def test_each_fault_gives_the_verdict_the_truth_names(lab: LabState, test_id: str) -> None:
    # Given a healthy lab
    assert healthy_within(lab.service_url, 1)
    # When the test's fault is on while the service is probed
    with fault(lab, test_id):
        verdict, worst_ms = verdict_of(sample(lab.service_url))
    # Then the SLO gives the verdict the ground truth names
    assert verdict is TRUTH.verdicts[test_id], f"{test_id}: worst {worst_ms:.0f} ms"
    # And with a margin: tolerant well inside the budget, degraded well inside the timeout
    if verdict is Verdict.TOLERANT:
        assert worst_ms < 0.75 * TRUTH.slo.p95_ms, f"{test_id}: worst {worst_ms:.0f} ms"
    if verdict is Verdict.DEGRADED:
        assert worst_ms < 0.8 * TRUTH.probe_timeout_s * 1000, f"{test_id}: {worst_ms:.0f} ms"
    # And the service recovers once the fault is gone
    assert healthy_within(lab.service_url, 5)
