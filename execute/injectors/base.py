"""The injector protocol: preflight, apply -> handle, revert(handle), and dry-run rules.

An injector turns one suite fault into kernel state inside the target's namespace and
back. Failures come back as data (Refusal) or as InjectorError, which the runner records
as the test's error reason; they never stop a suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Literal, Protocol

from depdrill.execute.model import ErrorReason
from depdrill.generate.model import Fault
from depdrill.netns import Target


@dataclass(frozen=True)
class FaultContext:
    """Everything an injector needs besides the fault itself."""

    target: Target
    run_id: str  # short, [a-z0-9]; names every kernel object: depdrill_<run_id>_<n>
    test_id: str
    deadline: datetime  # the fault must be gone by then, even if depdrill is not
    # Addresses the fault must never catch: the probe's path, depdrill's own control traffic.
    protected: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Refusal:
    reason: ErrorReason
    message: str


class InjectorError(Exception):
    def __init__(self, reason: ErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


KernelObjectKind = Literal["nft-table", "iptables-rule", "qdisc"]


@dataclass(frozen=True)
class KernelObject:
    """One thing a fault puts into the kernel, named so that cleanup can find and remove it."""

    kind: KernelObjectKind
    name: str  # nft table name; the iptables rule's comment tag; the qdisc handle "dd00:"
    where: str = ""  # nft family; "<binary> <table> <chain>"; the interface name
    spec: str = ""  # the exact iptables rule spec (after -A/-D), empty otherwise


@dataclass(frozen=True)
class Plan:
    """What apply() will install, decided before anything is installed (to journal it first)."""

    injector: str
    fault: Fault
    ctx: FaultContext
    rules: list[str]
    objects: list[KernelObject]


class Handle(Protocol):
    """What apply() returns: enough to revert, and what to show of it."""

    @property
    def rules(self) -> list[str]: ...

    def matched(self) -> int | None:
        """Packets the fault's rules have caught so far (None if the kernel cannot say)."""
        ...


class Injector(Protocol):
    name: ClassVar[str]

    def available(self) -> str | None:
        """None when this machine can run this injector, else why not (for `doctor`)."""
        ...

    def preflight(self, fault: Fault, ctx: FaultContext) -> Refusal | None: ...

    def rules(self, fault: Fault, ctx: FaultContext) -> list[str]:
        """The exact rules/messages apply() would install (for --dry-run and results)."""
        ...

    def plan(self, fault: Fault, ctx: FaultContext) -> Plan:
        """Name every kernel object and write every rule, installing nothing."""
        ...

    def apply_plan(self, plan: Plan) -> Handle:
        """Install exactly what plan() decided (the safety session journals the plan first)."""
        ...

    def apply(self, fault: Fault, ctx: FaultContext) -> Handle: ...

    def revert(self, handle: Handle) -> None: ...
