"""Proof that a fault bites, measured from inside a real namespace against real rules.

The rules here are written by the test itself with the nft CLI (a silent netdev egress drop,
and an inet output drop that is *not* silent), so the proof is checked independently of
depdrill's injectors.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from execute_servers import a_record, dns_server, tcp_listener

from depdrill.artifact import utcnow
from depdrill.execute.injectors.base import FaultContext
from depdrill.execute.injectors.nft_blackhole import NftBlackhole
from depdrill.execute.proof import Endpoint, FaultProof, covers, fault_endpoints, measure_in
from depdrill.generate.model import BlackholeFault, DnsBlackholeFault, LatencyFault
from depdrill.netns import Target
from depdrill.testing import RUN, ScratchNet


class NftCounterHandle:
    """The test's own rules, read back through the kernel's rule counter."""

    def __init__(self, ns: str, table: str, family: str, rules: list[str]) -> None:
        self.ns, self.table, self.family, self.rules = ns, table, family, rules

    def matched(self) -> int | None:
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, "nft", "-j", "list", "table", self.family, self.table],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        counters = [
            expr["counter"]["packets"]
            for item in json.loads(out)["nftables"]
            if "rule" in item
            for expr in item["rule"]["expr"]
            if "counter" in expr
        ]
        return sum(counters)


@contextmanager
def nft_rules(ns: str, family: str, chain: str, rule: str) -> Iterator[NftCounterHandle]:
    table = f"ddt{RUN}proof"
    ruleset = f"table {family} {table} {{\n chain c {{\n {chain};\n {rule}\n }}\n}}\n"
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset, check=True, text=True
    )
    try:
        yield NftCounterHandle(ns, table, family, [ruleset])
    finally:
        subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "delete", "table", family, table], check=False
        )


EGRESS = 'type filter hook egress device "eth0" priority 0'
OUTPUT = "type filter hook output priority 0"


def world(net: ScratchNet) -> tuple[Target, Target, Target]:
    return (
        Target(netns=net.add("svc", 2)),
        Target(netns=net.add("dep", 3)),
        Target(netns=net.add("other", 4)),
    )


def test_silent_blackhole_is_proven_and_control_still_answers(scratch_net: ScratchNet) -> None:
    # Given a service namespace, a dependency and another dependency, both listening
    svc, dep, other = world(scratch_net)
    dep_ip, other_ip = scratch_net.address(3), scratch_net.address(4)
    with tcp_listener(dep_ip, dep) as port, tcp_listener(other_ip, other) as other_port:
        fault = BlackholeFault(addresses=[dep_ip], ports=[port])
        proof = FaultProof(
            svc, fault, [Endpoint("tcp", dep_ip, port), Endpoint("tcp", other_ip, other_port)]
        )
        proof.before()
        # When a silent drop (netdev egress) covers the dependency
        assert svc.netns is not None
        with nft_rules(svc.netns, "netdev", EGRESS, f"ip daddr {dep_ip} counter drop") as h:
            result = proof.verify(h)
    # Then the dependency times out, the control still connects: the fault is effective
    assert result.effective, result
    (check,) = result.target
    assert check.ok and check.observed.startswith("timeout") and check.expected == "timeout"
    (control,) = result.control
    assert control.ok and control.what == f"tcp connect {other_ip}:{other_port}"
    assert control.observed.startswith("connected")


def test_a_fault_that_did_not_apply_is_not_effective(scratch_net: ScratchNet) -> None:
    # Given the same world, with no rule installed at all
    svc, dep, _ = world(scratch_net)
    dep_ip = scratch_net.address(3)
    with tcp_listener(dep_ip, dep) as port:
        proof = FaultProof(svc, BlackholeFault(addresses=[dep_ip], ports=[port]), [])
        proof.before()
        result = proof.verify(NftCounterHandle("", "", "", []))
    # Then the proof says so: the dependency still connects
    assert not result.effective
    assert (
        "connected" in result.target[0].observed
        and "not a silent drop" in result.target[0].observed
    )


def test_udp_blackhole_counts_packets_and_refuses_local_errors(scratch_net: ScratchNet) -> None:
    svc, _, _ = world(scratch_net)
    assert svc.netns is not None
    dep_ip = scratch_net.address(3)
    fault = BlackholeFault(addresses=[dep_ip], ports=[8125], protocols=["udp"])
    assert [e.kind for e in fault_endpoints(fault)] == ["udp"]
    # Given a silent UDP drop / Then the datagram is sent and the rule counter rises
    proof = FaultProof(svc, fault, [])
    proof.before()
    with nft_rules(
        svc.netns, "netdev", EGRESS, f"ip daddr {dep_ip} udp dport 8125 counter drop"
    ) as h:
        silent = proof.verify(h)
    assert silent.effective, silent
    assert "rule counter 0 -> 1" in silent.target[0].observed
    # Given an inet output drop instead / Then sendto fails with EPERM: not a silent drop
    with nft_rules(
        svc.netns, "inet", OUTPUT, f"ip daddr {dep_ip} udp dport 8125 counter drop"
    ) as h:
        loud = proof.verify(h)
    assert not loud.effective
    assert "EPERM" in loud.target[0].observed


def test_dns_blackhole_proof(scratch_net: ScratchNet) -> None:
    # Given a real name server in the dependency namespace, port 53
    svc, dep, other = world(scratch_net)
    assert svc.netns is not None
    dep_ip, other_ip = scratch_net.address(3), scratch_net.address(4)
    fault = DnsBlackholeFault(resolvers=[dep_ip])
    with dns_server(a_record(dep_ip), host=dep_ip, target=dep), tcp_listener(other_ip, other) as p:
        # The resolver itself is no control for a DNS fault; another dependency is
        proof = FaultProof(svc, fault, [Endpoint("dns", dep_ip, 53), Endpoint("tcp", other_ip, p)])
        assert [c.kind for c in proof.candidates] == ["tcp"]
        proof.before()
        with nft_rules(
            svc.netns, "netdev", EGRESS, f"ip daddr {dep_ip} udp dport 53 counter drop"
        ) as h:
            result = proof.verify(h)
    assert result.effective, result
    assert result.target[0].what == f"dns query {dep_ip}:53"


def test_covers() -> None:
    fault = LatencyFault(addresses=["198.19.0.3"], ports=[443], protocols=["tcp"], delay_ms=100)
    assert covers(fault, Endpoint("tcp", "198.19.0.3", 443))
    assert not covers(fault, Endpoint("tcp", "198.19.0.3", 80))
    assert not covers(fault, Endpoint("dns", "198.19.0.3", 53))
    assert covers(DnsBlackholeFault(resolvers=["198.19.0.3"]), Endpoint("dns", "198.19.0.3", 53))


def test_dns_blackhole_by_depdrills_injector_is_proven(scratch_net: ScratchNet) -> None:
    # Given a resolver and another dependency, and depdrill's own blackhole injector
    svc, dep, other = world(scratch_net)
    dep_ip, other_ip = scratch_net.address(3), scratch_net.address(4)
    fault = DnsBlackholeFault(resolvers=[dep_ip])
    ctx = FaultContext(
        target=svc,
        run_id=f"ddt{RUN}p",
        test_id="dns-blackhole",
        deadline=utcnow() + timedelta(seconds=30),
    )
    injector = NftBlackhole()
    with dns_server(a_record(dep_ip), host=dep_ip, target=dep), tcp_listener(other_ip, other) as p:
        proof = FaultProof(svc, fault, [Endpoint("tcp", other_ip, p)])
        proof.before()
        # When the injector silences the resolver
        handle = injector.apply(fault, ctx)
        try:
            result = proof.verify(handle)
        finally:
            injector.revert(handle)
        # Then queries time out, the other dependency still answers; and after the revert
        # the resolver answers again
        assert result.effective, result
        (again,) = measure_in(svc, [Endpoint("dns", dep_ip, 53)], 1.0)
    assert again.result == "answered"
