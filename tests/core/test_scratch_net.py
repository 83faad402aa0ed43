"""The shared namespace fixture works and leaves nothing behind."""

from __future__ import annotations

import subprocess

from depdrill.testing import ScratchNet, sh


def test_namespaces_on_the_bridge_reach_each_other_and_vanish(scratch_net: ScratchNet) -> None:
    # Given two namespaces on a scratch bridge
    a = scratch_net.add("a", 10)
    b = scratch_net.add("b", 11)
    # When one pings the other
    done = scratch_net.exec(a, "ping", "-c1", "-W1", scratch_net.address(11), check=False)
    # Then it answers, and both namespaces exist until teardown
    assert done.returncode == 0, done.stdout + done.stderr
    names = sh("ip", "netns", "list").stdout
    assert a in names and b in names
    scratch_net.teardown()
    assert a not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
