"""Following a dependency during a fault: new addresses it resolves to join the blackhole."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import dns.message
import dns.name
import dns.query
import dns.rrset
from execute_servers import dns_server, tcp_listener

from depdrill.artifact import utcnow
from depdrill.execute.follow import AddressFollower, addresses_for
from depdrill.execute.injectors.base import FaultContext
from depdrill.execute.injectors.nft_blackhole import NftBlackhole
from depdrill.execute.proof import Endpoint, measure_in
from depdrill.generate.model import BlackholeFault
from depdrill.netns import Target, entered
from depdrill.testing import RUN, ScratchNet


def response(qname: str, *records: tuple[str, str, str]) -> bytes:
    query = dns.message.make_query(qname, "A")
    reply = dns.message.make_response(query)
    for owner, rdtype, value in records:
        reply.answer.append(dns.rrset.from_text(owner, 60, "IN", rdtype, value))
    return reply.to_wire()


def test_addresses_for_follows_cname_chains_in_any_order() -> None:
    name = dns.name.from_text("www.test")
    wire = response(
        "www.test",
        ("edge.test.", "A", "198.19.0.6"),
        ("cdn.test.", "CNAME", "edge.test."),
        ("www.test.", "CNAME", "cdn.test."),
        ("other.test.", "A", "198.19.0.7"),
    )
    assert addresses_for(wire, name) == {"198.19.0.6"}
    assert addresses_for(response("www.test", ("www.test.", "AAAA", "2001:db8::1")), name) == {
        "2001:db8::1"
    }
    # A query (not an answer) and garbage give nothing
    assert addresses_for(dns.message.make_query("www.test", "A").to_wire(), name) == set()
    assert addresses_for(b"\xff" * 40, name) == set()


def ask(svc: Target, server: str, qname: str) -> None:
    """The service resolving a name: a real query from inside its namespace."""
    with entered(svc):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setblocking(False)  # dnspython waits with select() on a socket handed to it
        dns.query.udp(dns.message.make_query(qname, "A"), server, timeout=2, sock=sock)


def test_new_addresses_join_the_blackhole(scratch_net: ScratchNet) -> None:
    # Given a service, its resolver, and the dependency's new home at .4 (listening)
    svc = Target(netns=scratch_net.add("svc", 2))
    resolver = Target(netns=scratch_net.add("dns", 3))
    moved = Target(netns=scratch_net.add("new", 4))
    dns_ip, new_ip = scratch_net.address(3), scratch_net.address(4)

    def answer(query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        qname = query.question[0].name
        if qname == dns.name.from_text("www.test"):
            reply.answer.append(dns.rrset.from_text("www.test.", 60, "IN", "CNAME", "edge.test."))
            reply.answer.append(dns.rrset.from_text("edge.test.", 60, "IN", "A", new_ip))
        else:
            reply.answer.append(dns.rrset.from_text(qname, 60, "IN", "A", "198.19.0.99"))
        return reply

    fault = BlackholeFault(addresses=[scratch_net.address(5)], protocols=["tcp", "udp"])
    ctx = FaultContext(
        target=svc,
        run_id=f"ddt{RUN}f",
        test_id="blackhole:www.test",
        deadline=utcnow() + timedelta(seconds=30),
    )
    injector = NftBlackhole()
    with (
        dns_server(answer, host=dns_ip, target=resolver),
        tcp_listener(new_ip, moved) as port,
    ):
        target_endpoint = Endpoint("tcp", new_ip, port)
        (before,) = measure_in(svc, [target_endpoint], 1.0)
        assert before.result == "connected"
        # When the fault on the old address is on and the service resolves the name anew
        handle = injector.apply(fault, ctx)
        try:
            with AddressFollower(svc, "www.test", handle) as follower:
                assert follower.wait_ready(5) and follower.errors == []
                ask(svc, dns_ip, "unrelated.test")
                ask(svc, dns_ip, "www.test")
                deadline = time.monotonic() + 3
                while not follower.added and time.monotonic() < deadline:
                    time.sleep(0.02)
            # Then the new address joined the fault, and the fault now bites there too
            assert follower.added == [new_ip], follower.errors
            assert any(new_ip in rule for rule in handle.rules)
            (after,) = measure_in(svc, [target_endpoint], 1.0)
            assert after.result == "timeout"
        finally:
            injector.revert(handle)
