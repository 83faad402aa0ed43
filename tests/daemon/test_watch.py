"""Continuous discovery: windows merge into the period's graph, and a namespace that is
deleted and created again (a container restart) is found again by the same selector."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

import pytest

from depdrill.bpf import attached
from depdrill.daemon.config import DaemonSettings, ServiceConfig
from depdrill.daemon.watch import Watch
from depdrill.netns import Target, entered
from depdrill.testing import ScratchNet, sh


def _until(check: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def _watch(net: ScratchNet, ns: str) -> Watch:
    """A watch over `ns` in 30 s windows."""
    service = ServiceConfig.model_validate(
        {
            "name": "svc",
            "target": {"netns": ns},
            "probes": [f"http://{net.address(10)}:8080/"],
            "schedule": {"cron": "0 2 * * *"},
            "output_dir": "/nonexistent",
        }
    )
    return Watch(service, DaemonSettings(discovery_window_s=30, retry_s=0.2))


def test_a_recreated_namespace_is_found_again(
    scratch_net: ScratchNet, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a service namespace watched in 30 s windows
    ns = scratch_net.add("svc", 10)
    watch = _watch(scratch_net, ns)
    resolver = scratch_net.host_address

    def lookup(name: str) -> None:
        scratch_net.exec(ns, "dig", "+tries=1", "+time=1", f"@{resolver}", name, check=False)

    with caplog.at_level(logging.INFO, logger="depdrill.daemon"):
        watch.start()
        try:
            _until(lambda: watch.capturing)
            lookup("before.test")
            # When a snapshot is taken
            first = watch.snapshot()
            # Then the lookup is in it
            assert first is not None
            assert [d.name for d in first.dependencies()] == ["before.test"], caplog.text
            # When the namespace is deleted
            sh("ip", "netns", "del", ns)
            _until(lambda: watch.target is None)
            # And created again under the same name
            scratch_net.add("svc", 10)
            _until(lambda: watch.capturing)
            lookup("after.test")
            second = watch.snapshot()
        finally:
            watch.stop()
    # Then discovery carried on in the new namespace, and the next period starts fresh
    assert second is not None
    assert [d.name for d in second.dependencies()] == ["after.test"], caplog.text
    # And the outage and the recovery were one line each
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "target lost:" in m]) == 1, messages
    assert len([m for m in messages if "recovered (target lost)" in m]) == 1, messages


def test_a_pausing_snapshot_keeps_the_namespace_free_until_resumed(
    scratch_net: ScratchNet,
) -> None:
    # Given a service namespace watched through the default tap
    ns = scratch_net.add("svc", 10)
    watch = _watch(scratch_net, ns)

    def footprint() -> int:
        """What a capture adds to the namespace: nflog's table, or eBPF's programs."""
        listing = scratch_net.exec(ns, "nft", "list", "tables").stdout
        tables = [line for line in listing.splitlines() if "depdrill-capture-" in line]
        with entered(Target(netns=ns)):
            eth0 = socket.if_nametoindex("eth0")
            return len(tables) + attached(eth0, True) + attached(eth0, False)

    watch.start()
    try:
        _until(lambda: watch.capturing)
        assert footprint() > 0
        # When a scan takes its snapshot and pauses discovery (as Daemon._scan does)
        watch.snapshot(pause=True)
        time.sleep(0.5)
        # Then no window is open and the capture is gone from the namespace for the faults
        assert not watch.capturing and footprint() == 0
        # And after the scan, discovery comes back
        watch.resume()
        _until(lambda: watch.capturing)
        assert footprint() > 0
    finally:
        watch.stop()
    assert footprint() == 0
