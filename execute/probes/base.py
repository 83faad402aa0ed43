"""The probe protocol: run(deadline) -> Observation. A probe defines 'healthy'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Observation:
    ok: bool
    latency_ms: float | None  # None when no answer came at all
    error: str | None = None  # one line, e.g. "timeout after 5.0 s", "HTTP 503"


class Probe(Protocol):
    def run(self, deadline: float) -> Observation:
        """Probe once; give up at `deadline` (time.monotonic()). Never raises."""
        ...


def describe_os_error(exc: OSError) -> str:
    """One line naming the errno, e.g. 'connection refused (ECONNREFUSED)'."""
    import errno
    import socket

    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    if exc.errno is None:
        return exc.__class__.__name__
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    text = (exc.strerror or name).lower()
    return f"{text} ({name})"
