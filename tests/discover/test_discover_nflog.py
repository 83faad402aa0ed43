"""The NFLOG capture in real namespaces: its table's life, and the one case it must stay
away from (a bound NFQUEUE). What it shares with the eBPF tap: test_discover_taps.py."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest

from depdrill.discover.ebpf import EbpfCapture
from depdrill.discover.nflog import NflogCapture, NflogUnavailable, queues_in_use
from depdrill.discover.run import open_tap
from depdrill.netns import Target, entered
from depdrill.testing import ScratchNet

HOLDER = """
import sys, time
from depdrill.discover.nflog import NflogCapture
from depdrill.netns import Target
capture = NflogCapture.open(Target(netns=sys.argv[1]))
print("ready", flush=True)
time.sleep(60)
"""


def _tables(net: ScratchNet, ns: str) -> list[str]:
    return [
        line.split()[-1]
        for line in net.exec(ns, "nft", "list", "tables").stdout.splitlines()
        if "depdrill-capture-" in line
    ]


def test_the_table_goes_with_the_capture_and_with_its_killed_process(
    scratch_net: ScratchNet,
) -> None:
    # Given a service namespace
    svc = scratch_net.add("svc", 10)
    # When a capture opens and closes
    with NflogCapture.open(Target(netns=svc)) as capture:
        assert _tables(scratch_net, svc) == [capture.filter.split()[2]]
    # Then its table is gone
    assert _tables(scratch_net, svc) == []
    # And when the process holding a capture is killed outright
    with subprocess.Popen(
        [sys.executable, "-P", "-c", HOLDER, svc], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
            assert len(_tables(scratch_net, svc)) == 1
        finally:
            holder.kill()
    # Then the kernel removes the table with the socket that owned it
    deadline = time.monotonic() + 5
    while _tables(scratch_net, svc) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tables(scratch_net, svc) == []


def test_a_bound_nfqueue_keeps_nflog_out_of_its_namespace(scratch_net: ScratchNet) -> None:
    # Given a namespace where a queue is bound (an IPS, or depdrill's own latency fault)
    from netfilterqueue import NetfilterQueue

    svc = scratch_net.add("svc", 10)
    target = Target(netns=svc)
    with entered(target):
        queue = NetfilterQueue()
        queue.bind(4242, lambda packet: packet.accept())
        assert queues_in_use() == [4242]
    try:
        # When discovery asks for the nflog capture, it is refused in one line
        with pytest.raises(NflogUnavailable, match="NFQUEUE queue 4242 is bound"):
            NflogCapture.open(target)
        # And "auto" captures through eBPF, which touches no netfilter hook (nothing to say)
        capture, why = open_tap(target, "auto")
        with contextlib.closing(capture):
            assert isinstance(capture, EbpfCapture) and why == ""
        # And the CLI gives the same reason as a one-line error
        done = subprocess.run(
            [sys.executable, "-P", "-m", "depdrill.cli", "discover", "--netns", svc,
             "--tap", "nflog", "--duration", "0.2", "-o", "/dev/null"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode != 0 and last.startswith("depdrill: error: NFQUEUE queue 4242")
        assert "Traceback" not in done.stderr
    finally:
        queue.unbind()
    assert _tables(scratch_net, svc) == []
