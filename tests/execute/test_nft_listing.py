"""What depdrill reads back from nft's text listings (it no longer trusts libnftables' JSON:
1.0.6 sometimes ends it at an owner table's `"flags": `, which once hid a blackhole's
counters and would have hidden tables from cleanup)."""

from __future__ import annotations

from depdrill.execute.injectors.nft_blackhole import counted
from depdrill.execute.safety.cleanup import listed_tables
from depdrill.libnftables import NftContext
from depdrill.netns import Target, entered
from depdrill.testing import ScratchNet

LISTING = """table netdev depdrill_ab12cd_1 { # progname python
\tflags owner
\tchain egress {
\t\ttype filter hook egress device "eth0" priority -500; policy accept;
\t\tip daddr @d4 udp dport 8125 counter packets 12 bytes 480 drop
\t\tip6 daddr @d6 udp dport 8125 counter packets 0 bytes 0 drop
\t}
\tchain ingress {
\t\tip saddr @d4 udp sport 8125 counter packets 3 bytes 120 drop
\t}
}
"""


def test_counters_are_summed_from_the_text_listing() -> None:
    assert counted(LISTING) == 15
    assert counted("table netdev x {\n}\n") == 0


def test_tables_are_read_from_the_text_listing() -> None:
    listing = "table inet filter\ntable netdev depdrill_ab12cd_1\n\ntable ip6 nat\n"
    assert listed_tables(listing) == [
        ("inet", "filter"),
        ("netdev", "depdrill_ab12cd_1"),
        ("ip6", "nat"),
    ]


def test_a_real_listing_reads_back(scratch_net: ScratchNet) -> None:
    # Given a real owner table with counters that have counted, in a scratch namespace
    svc = scratch_net.add("svc", 10)
    with entered(Target(netns=svc)):
        nft = NftContext()
    with nft:
        nft.run(
            "table inet depdrill_listing_1 {\n flags owner\n chain out {\n"
            "  type filter hook output priority 0; policy accept;\n"
            "  udp dport 9 counter\n }\n}\n"
        )
        scratch_net.exec(svc, "python3", "-c", "import socket; s = socket.socket(2, 2); "
                         "[s.sendto(b'x', ('127.0.0.1', 9)) for _ in range(3)]")  # fmt: skip
        # Then the text listing gives the count and the table
        assert counted(nft.run("list table inet depdrill_listing_1\n")) == 3
        assert ("inet", "depdrill_listing_1") in listed_tables(nft.run("list tables\n"))
