"""nftnl: the queue rule sent as raw nf_tables netlink, read back by the real `nft`."""

from __future__ import annotations

import errno
import subprocess
import time

import pytest

from depdrill.execute.injectors.nftnl import NetlinkError, NftSocket, QueueRule
from depdrill.netns import Target, entered
from depdrill.testing import ScratchNet


def _ruleset(namespace: str) -> str:
    argv = ["ip", "netns", "exec", namespace, "nft", "list", "ruleset"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_the_queue_rule_is_what_nft_lists_and_goes_with_its_socket(
    scratch_net: ScratchNet,
) -> None:
    # Given a netlink socket born in a namespace
    namespace = scratch_net.add("n", 2)
    with entered(Target(netns=namespace)):
        sock = NftSocket()
    rules = [
        QueueRule(f, f"depdrill_nl_1_{f}", "output", 0, 0x0DD00000, 0xDD42) for f in ("ip", "ip6")
    ]
    try:
        # When both families' tables are added in one batch
        sock.add(*rules)
        listed = _ruleset(namespace)
        # Then nft lists each exactly as the rule's own text says, owner flag included
        for rule in rules:
            assert f"table {rule.family} {rule.table}" in listed
        assert listed.count("flags owner") == 2
        assert listed.count("type filter hook output priority filter; policy accept;") == 2
        assert listed.count("meta mark & 0x0dd00000 == 0x0dd00000 queue num 56642 bypass") == 2
        assert "queue num 56642 bypass" in rules[0].text()
        # And adding a table that exists fails as a whole, with the kernel's reason
        with pytest.raises(NetlinkError) as refused:
            sock.add(rules[0])
        assert refused.value.errno == errno.EEXIST
        assert "depdrill_nl_1_ip" in str(refused.value) and "File exists" in str(refused.value)
        # And one table can be deleted on its own
        sock.delete("ip", rules[0].table)
        assert f"table ip {rules[0].table} " not in _ruleset(namespace)
    finally:
        sock.close()
    # And when the socket closes, the kernel removes what it still owned
    give_up = time.monotonic() + 2
    while "depdrill" in _ruleset(namespace) and time.monotonic() < give_up:
        time.sleep(0.02)
    assert "depdrill" not in _ruleset(namespace)


def test_a_closed_socket_refuses_with_a_reason() -> None:
    sock = NftSocket()
    sock.close()
    assert sock.closed
    with pytest.raises(NetlinkError) as refused:
        sock.delete("ip", "depdrill_nl_gone")
    assert refused.value.errno == errno.EBADF
