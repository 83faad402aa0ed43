"""Read the server name (SNI) from a TLS ClientHello in a connection's first data segment.

Bounded and defensive: every length is checked against the bytes at hand, and a ClientHello
cut short before its server_name extension simply yields None. The name is the client's
text, kept as sent (bytes outside printable ASCII escaped as \\DDD, as DNS names are),
lower-cased, no trailing dot.
"""

from __future__ import annotations

from typing import Final

_HANDSHAKE: Final = 0x16
_CLIENT_HELLO: Final = 0x01
_SERVER_NAME: Final = 0x0000
_HOST_NAME: Final = 0x00
_MAX_NAME: Final = 253


def is_client_hello(payload: bytes) -> bool:
    return len(payload) >= 6 and payload[0] == _HANDSHAKE and payload[1] == 3 and payload[5] == 1


def server_name(payload: bytes) -> str | None:
    """The host_name of the ClientHello's server_name extension, or None."""
    if not is_client_hello(payload):
        return None
    record_end = min(len(payload), 5 + int.from_bytes(payload[3:5], "big"))
    reader = _Reader(payload, 9, record_end)  # record header (5) + handshake header (4)
    if not (reader.skip(2 + 32) and reader.skip_vector(1) and reader.skip_vector(2)):
        return None  # version, random, session id, cipher suites
    if not reader.skip_vector(1):  # compression methods
        return None
    extensions_len = reader.uint(2)
    if extensions_len is None:
        return None
    end = min(record_end, reader.pos + extensions_len)
    while reader.pos + 4 <= end:
        ext_type, ext_len = reader.uint(2), reader.uint(2)
        if ext_type is None or ext_len is None:
            return None
        if ext_type == _SERVER_NAME:
            return _host_name(_Reader(payload, reader.pos, min(end, reader.pos + ext_len)))
        if not reader.skip(ext_len):
            return None
    return None


def _host_name(reader: _Reader) -> str | None:
    list_len = reader.uint(2)
    if list_len is None:
        return None
    end = min(reader.end, reader.pos + list_len)
    while reader.pos + 3 <= end:
        kind, length = reader.uint(1), reader.uint(2)
        if kind is None or length is None or reader.pos + length > end:
            return None
        raw = reader.data[reader.pos : reader.pos + length]
        if kind == _HOST_NAME:
            name = _presentation(raw[:_MAX_NAME]).lower().rstrip(".")
            return name or None
        reader.pos += length
    return None


def _presentation(raw: bytes) -> str:
    """Bytes as DNS presentation text: printable ASCII kept, anything else as \\DDD."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x5C else f"\\{b:03d}" for b in raw)


class _Reader:
    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def uint(self, size: int) -> int | None:
        if self.pos + size > self.end:
            return None
        value = int.from_bytes(self.data[self.pos : self.pos + size], "big")
        self.pos += size
        return value

    def skip(self, size: int) -> bool:
        if self.pos + size > self.end:
            return False
        self.pos += size
        return True

    def skip_vector(self, length_size: int) -> bool:
        length = self.uint(length_size)
        return length is not None and self.skip(length)
