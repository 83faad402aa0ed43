"""netem-latency: the tc messages it would send, and why this machine cannot send them."""

from __future__ import annotations

import socket
import struct
import subprocess

from fault_world import FaultWorld, fault_world_fixture  # noqa: F401

from depdrill.execute.injectors.netem_latency import (
    DELAY_BAND,
    NETEM_HANDLE,
    NORMAL_BAND,
    PRIO_HANDLE,
    TC_H_ROOT,
    NetemLatency,
    message,
    tc_calls,
)
from depdrill.execute.injectors.nfqueue_latency import NfqueueLatency
from depdrill.execute.injectors.registry import INJECTORS, availability, choose
from depdrill.execute.injectors.scope import scope_of
from depdrill.generate.model import BlackholeFault, LatencyFault

TICKS_PER_US = 1000 / 64  # psched ticks are 64 ns


def _u32_key(data: bytes, mask: int, value: int, offset: int) -> bool:
    """Is this tc_u32_key (mask, value big-endian; offset host order) in the message?"""
    return struct.pack(">II", mask, value) + struct.pack("=ii", offset, 0) in data


def test_calls_build_a_prio_root_netem_band_and_filters() -> None:
    # Given 100 ms +- 5 ms on one address, port 443, TCP
    fault = LatencyFault(
        addresses=["198.19.250.2"], ports=[443], protocols=["tcp"], delay_ms=100, jitter_ms=5
    )
    # When the calls are built for eth0
    calls = tc_calls(["eth0"], scope_of(fault), fault.delay_ms, fault.jitter_ms)
    # Then: a prio root with depdrill's handle, netem under its fourth band, one filter
    assert [(c.command, c.kind) for c in calls] == [
        ("add", "prio"),
        ("add", "netem"),
        ("add-filter", "u32"),
    ]
    prio, netem, u32 = (message(c, 7) for c in calls)
    assert (prio["index"], prio["handle"], prio["parent"]) == (7, PRIO_HANDLE, TC_H_ROOT)
    assert prio.get_attr("TCA_KIND") == "prio"
    assert prio.get_attr("TCA_OPTIONS")["bands"] == 4
    assert netem.get_attr("TCA_KIND") == "netem"
    assert (netem["handle"], netem["parent"]) == (NETEM_HANDLE, DELAY_BAND)
    options = netem.get_attr("TCA_OPTIONS")
    assert options["delay"] == round(100_000 * TICKS_PER_US)
    assert options["jitter"] == round(5_000 * TICKS_PER_US)
    assert u32.get_attr("TCA_KIND") == "u32" and u32["parent"] == PRIO_HANDLE
    raw = u32.data
    address = int.from_bytes(socket.inet_aton("198.19.250.2"), "big")
    assert _u32_key(raw, 0xFFFFFFFF, address, 16)  # IPv4 destination
    assert struct.pack("=I", DELAY_BAND) in raw  # classid: the netem band


def test_port_53_is_kept_out_by_a_first_filter_unless_dns() -> None:
    # Given latency on every port of an address
    fault = LatencyFault(addresses=["198.19.250.2"], protocols=["udp"], delay_ms=10)
    # When built
    calls = tc_calls(["eth0"], scope_of(fault), 10, 0)
    filters = [c for c in calls if c.command == "add-filter"]
    # Then a higher-priority filter sends port 53 to an ordinary band, then the rest waits
    assert [f.options["target"] for f in filters] == [NORMAL_BAND, DELAY_BAND]
    assert filters[0].options["prio"] < filters[1].options["prio"]
    assert "0x0035/0xffff+22" in filters[0].options["keys"]


def test_ipv6_filters_match_all_four_address_words() -> None:
    fault = LatencyFault(addresses=["fd00:dd::3"], ports=[8443], protocols=["tcp"], delay_ms=10)
    (u32,) = [c for c in tc_calls(["eth0"], scope_of(fault), 10, 0) if c.kind == "u32"]
    assert u32.options["protocol"] == 0x86DD
    raw = message(u32, 3).data
    assert _u32_key(raw, 0xFFFFFFFF, 0xFD0000DD, 24)
    assert _u32_key(raw, 0xFFFFFFFF, 0x00000003, 36)


def test_dry_run_shows_the_same_calls(fault_world: FaultWorld) -> None:
    world = fault_world
    fault = LatencyFault(addresses=[world.dependency], delay_ms=20)
    rules = NetemLatency().rules(fault, world.ctx())
    assert rules[0].startswith("tc('add', 'prio', index=<eth0>, handle=0xdd000000")
    assert any("'netem'" in r and "delay=20000" in r for r in rules)


def test_availability_says_why_and_choose_follows_it() -> None:
    # Given what this machine offers
    offered = availability()
    assert set(offered) == set(INJECTORS)
    netem = offered["netem-latency"]
    latency = choose(LatencyFault(addresses=["198.19.0.5"], delay_ms=10))
    # Then latency goes to netem where the kernel has it, else to NFQUEUE
    if netem == "available":
        assert isinstance(latency, NetemLatency)
    else:
        assert "sch_" in netem and "throwaway namespace" in netem
        assert isinstance(latency, NfqueueLatency)
    assert choose(BlackholeFault(addresses=["198.19.0.5"])).name == "nft-blackhole"


def test_a_root_qdisc_someone_else_made_is_never_replaced(fault_world: FaultWorld) -> None:
    # Given the service's interface with the kernel's own root (noqueue on a veth)
    world = fault_world
    assert NetemLatency._foreign_roots(world.service, ["eth0"]) is None
    # When someone configures a root qdisc of their own there
    prefix = world.service.exec_prefix()
    subprocess.run(
        [
            *prefix,
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "handle",
            "5:",
            "tbf",
            "rate",
            "1gbit",
            "burst",
            "64kb",
            "latency",
            "50ms",
        ],
        check=True,
    )
    # Then depdrill names it and stays away
    why = NetemLatency._foreign_roots(world.service, ["eth0"])
    assert why is not None and "tbf 5:" in why and "never replaces" in why
