"""Test helpers shipped with the package: a lab built for a test run and always removed."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from depdrill.errors import TargetError
from depdrill.lab import world
from depdrill.lab.model import LabState

# Tests use 198.18.100-199 so they never meet a lab someone built by hand (198.18.0 and up).
TEST_SUBNETS = range(100, 200)


def run_prefix() -> str:
    """A per-run prefix: `ddt` and 4 hex digits (names stay within IFNAMSIZ)."""
    return "ddt" + secrets.token_hex(2)


def free_subnet_index(candidates: range = TEST_SUBNETS) -> int:
    """A 198.18.N.0/24 with no address or route on this host, picked at random."""
    listing = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    routes = subprocess.run(
        ["ip", "-4", "route", "show"], capture_output=True, text=True, check=True
    ).stdout
    free = [n for n in candidates if f"198.18.{n}." not in listing + routes]
    if not free:
        raise TargetError(f"no free subnet among 198.18.{candidates.start}-{candidates.stop - 1}")
    return free[secrets.randbelow(len(free))]


@contextmanager
def lab_session(prefix: str | None = None, subnet_index: int | None = None) -> Iterator[LabState]:
    """A lab that is up for the body and removed afterwards, whatever happened.

    Usage in a conftest: `with lab_session() as state: yield state` in a session fixture.
    """
    prefix = prefix or run_prefix()
    index = free_subnet_index() if subnet_index is None else subnet_index
    try:
        yield world.up(prefix=prefix, subnet_index=index)
    finally:
        world.down(prefix)
