"""SNI from ClientHellos made by a real TLS stack, and from cut or hostile bytes."""

from __future__ import annotations

from discover_world import client_hello
from hypothesis import given, settings
from hypothesis import strategies as st

from depdrill.discover.sni import is_client_hello, server_name


def test_server_name_of_a_real_client_hello() -> None:
    # Given OpenSSL's ClientHello for API.Example.TEST
    hello = client_hello("API.Example.TEST")
    # Then it is recognised and its name read, lower-cased
    assert is_client_hello(hello)
    assert server_name(hello) == "api.example.test"


def test_a_client_hello_without_sni_has_no_name() -> None:
    # Given a ClientHello to a bare address (no server_name extension)
    hello = client_hello(None)
    # Then it is a ClientHello with no name
    assert is_client_hello(hello) and server_name(hello) is None


def test_every_cut_of_a_client_hello_yields_the_name_or_nothing() -> None:
    # Given a real ClientHello cut at every length (a first segment may hold part of it)
    hello = client_hello("svc.x.test")
    # When each prefix is read
    names = {server_name(hello[:n]) for n in range(len(hello) + 1)}
    # Then it is either the right name or None, never a wrong name or an exception
    assert names == {None, "svc.x.test"}


def test_odd_bytes_in_the_name_are_escaped_not_trusted() -> None:
    # Given a ClientHello whose host_name was patched to hold a NUL, a newline and UTF-8
    hello = bytearray(client_hello("aaaaaaaaaaaa.test"))
    at = bytes(hello).index(b"aaaaaaaaaaaa.test")
    hello[at : at + 12] = b"a\x00b\nc\xc3\xa9dddde"
    # Then the name keeps those bytes as visible escapes
    assert server_name(bytes(hello)) == "a\\000b\\010c\\195\\169dddde.test"


@given(st.binary(max_size=400))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    # Given any bytes that start like a TLS handshake record
    hello = b"\x16\x03\x01" + data[:2] + b"\x01" + data[2:]
    # When read, Then the result is a bounded string or None
    name = server_name(hello)
    assert name is None or 0 < len(name) <= 4 * 253


MUTABLE_HELLO = client_hello("m.x.test")


@given(st.integers(min_value=0, max_value=2000), st.binary(min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_mutated_client_hellos_never_raise(at: int, junk: bytes) -> None:
    # Given a real ClientHello with bytes overwritten somewhere (lengths included)
    hello = bytearray(MUTABLE_HELLO)
    at %= len(hello)
    hello[at : at + len(junk)] = junk
    # When read, Then nothing raises
    name = server_name(bytes(hello))
    assert name is None or len(name) <= 4 * 253
