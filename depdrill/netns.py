"""Targets: the network namespace of the service under test, by name or by pid.

Entering a namespace is per thread (setns(2) with CLONE_NEWNET changes only the calling
thread), so sockets opened inside `entered()` stay bound to the target's namespace after
the thread returns to its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import model_validator

from depdrill.artifact import Frozen
from depdrill.errors import CapabilityError, TargetError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Target(Frozen):
    """Where the service lives: an `ip netns` name or a process id (a container, a pod)."""

    netns: str | None = None
    pid: int | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Target:
        if (self.netns is None) == (self.pid is None):
            raise ValueError("a target is exactly one of netns or pid")
        if self.netns is not None and (
            not self.netns or "/" in self.netns or self.netns in {".", ".."}
        ):
            raise ValueError(f"not a namespace name: {self.netns!r}")
        if self.pid is not None and self.pid <= 0:
            raise ValueError(f"not a process id: {self.pid}")
        return self

    def describe(self) -> str:
        return f"netns {self.netns}" if self.netns is not None else f"pid {self.pid}"

    @property
    def path(self) -> Path:
        if self.netns is not None:
            return NETNS_RUN_DIR / self.netns
        return Path(f"/proc/{self.pid}/ns/net")

    def check(self) -> None:
        """Raise TargetError unless the namespace exists and can be opened."""
        path = self.path
        if not path.exists():
            what = "no network namespace named" if self.netns else "no process with id"
            raise TargetError(f"{what} {self.netns or self.pid} ({path} does not exist)")
        try:
            os.close(os.open(path, os.O_RDONLY))
        except PermissionError:
            raise CapabilityError(
                f"cannot open {path}: permission denied (run as root, see `depdrill doctor`)"
            ) from None

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command inside the target's network namespace."""
        self.check()
        return ["nsenter", f"--net={self.path}", "--"]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == 1:
            raise CapabilityError("setns: operation not permitted (needs CAP_SYS_ADMIN)")
        raise TargetError(f"setns failed: {os.strerror(err)}")


@contextmanager
def entered(target: Target) -> Iterator[None]:
    """Run the body in the target's network namespace (this thread only)."""
    target.check()
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        try:
            theirs = os.open(target.path, os.O_RDONLY)
        except FileNotFoundError:  # removed since check(): the same error as before it
            target.check()
            raise
        try:
            _setns(theirs)
        finally:
            os.close(theirs)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def same_as_host(target: Target) -> bool:
    """True when the target is the namespace depdrill itself runs in (refused for faults)."""
    return os.stat(target.path).st_ino == os.stat("/proc/self/ns/net").st_ino
