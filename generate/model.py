"""The suite: the tests depdrill runs against a service, as a team reviews and commits them.

A suite from a repository is untrusted input that root will run: every field is typed and
bounded here, and nothing outside this model reaches an injector.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from depdrill.artifact import Artifact, Frozen
from depdrill.netns import Target

Proto = Literal["tcp", "udp"]
Port = Annotated[int, Field(ge=1, le=65535)]
_TEST_ID = re.compile(r"^[a-z0-9-]+(:[^\s:]{1,253})?(:[0-9]{1,5})?$")


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None


IpAddress = Annotated[str, AfterValidator(_ip)]


class HttpProbe(Frozen):
    """GET a URL from outside the service's namespace; healthy is the expected status."""

    kind: Literal["http"] = "http"
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)]
    expect_status: Annotated[int, Field(ge=100, le=599)] = 200
    body_contains: str | None = None
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0


class TcpProbe(Frozen):
    kind: Literal["tcp"] = "tcp"
    host: IpAddress
    port: Port
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 2.0


class DnsProbe(Frozen):
    kind: Literal["dns"] = "dns"
    server: IpAddress
    name: Annotated[str, Field(min_length=1, max_length=253)]
    qtype: Literal["A", "AAAA"] = "A"
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 2.0


class CommandProbe(Frozen):
    """Run a command; exit 0 is healthy. Runs only with --allow-commands."""

    kind: Literal["command"] = "command"
    argv: Annotated[list[str], Field(min_length=1)]
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0


Probe = Annotated[HttpProbe | TcpProbe | DnsProbe | CommandProbe, Field(discriminator="kind")]


class Slo(Frozen):
    """What healthy means while a fault is on."""

    success_ratio: Annotated[float, Field(ge=0, le=1)] = 0.95
    p95_ms: Annotated[float, Field(gt=0)] = 800.0
    # Below this success ratio under a fault, the service counts as down (verdict failed).
    down_ratio: Annotated[float, Field(ge=0, le=1)] = 0.5


class Timing(Frozen):
    interval_s: Annotated[float, Field(ge=0.05, le=60)] = 0.25
    baseline_s: Annotated[float, Field(ge=0.5, le=600)] = 2.0
    observe_s: Annotated[float, Field(ge=1, le=3600)] = 8.0
    recovery_s: Annotated[float, Field(ge=1, le=3600)] = 15.0
    # Hard limit on how long any fault may stay on; the kernel-side expiry uses it too.
    max_fault_s: Annotated[float, Field(ge=5, le=7200)] = 120.0


class ServiceSpec(Frozen):
    name: Annotated[str, Field(min_length=1, max_length=253)]
    target: Target
    probes: Annotated[list[Probe], Field(min_length=1)]
    slo: Slo = Slo()


class Selection(Frozen):
    """How the generator chose the tests, so that a regeneration chooses the same way."""

    latency_ms: list[Annotated[int, Field(ge=1, le=60_000)]] = [100, 1000]
    jitter_ms: Annotated[int, Field(ge=0, le=60_000)] = 0
    include: list[Annotated[str, Field(max_length=253)]] = []  # globs on dependency names
    exclude: list[Annotated[str, Field(max_length=253)]] = []


class Defaults(Frozen):
    timing: Timing = Timing()
    warn_days: Annotated[int, Field(ge=0, le=3650)] = 30
    ca_bundle: str | None = None
    selection: Selection | None = None  # written by the generator; not read by the runner


class BlackholeFault(Frozen):
    """Drop, silently and in both directions, all traffic to and from the dependency."""

    kind: Literal["blackhole"] = "blackhole"
    addresses: Annotated[list[IpAddress], Field(min_length=1)]
    ports: list[Port] = []  # empty: every port of those addresses
    protocols: list[Proto] = ["tcp", "udp"]


class LatencyFault(Frozen):
    """Add delay to the dependency's packets (receive path by default: replies wait)."""

    kind: Literal["latency"] = "latency"
    addresses: Annotated[list[IpAddress], Field(min_length=1)]
    ports: list[Port] = []
    protocols: list[Proto] = ["tcp", "udp"]
    delay_ms: Annotated[int, Field(ge=1, le=60_000)]
    jitter_ms: Annotated[int, Field(ge=0, le=60_000)] = 0
    direction: Literal["receive", "send"] = "receive"


class DnsBlackholeFault(Frozen):
    """Silence the service's resolvers (port 53, UDP and TCP)."""

    kind: Literal["dns-blackhole"] = "dns-blackhole"
    resolvers: Annotated[list[IpAddress], Field(min_length=1)]


Fault = Annotated[BlackholeFault | LatencyFault | DnsBlackholeFault, Field(discriminator="kind")]


class CertCheck(Frozen):
    """Check the TLS chain an endpoint serves (no fault)."""

    kind: Literal["cert"] = "cert"
    address: IpAddress
    port: Port
    sni: Annotated[str, Field(min_length=1, max_length=253)]


class SuiteTest(Frozen):
    __test__: ClassVar[bool] = False

    id: Annotated[str, Field(max_length=300)]
    dependency: Annotated[str, Field(max_length=253)] | None = None
    why: str = ""  # how discovery justified this test ("seen 412 queries, ...")
    fault: Fault | None = None
    check: CertCheck | None = None
    skip: bool = False
    note: str | None = None
    slo: Slo | None = None  # overrides the service's SLO for this test
    # Set by a regeneration: the dependency was not in the latest graph, and the test stays
    # only because a person edited it. A removed test is not run.
    removed: bool = False

    @model_validator(mode="after")
    def _one_action(self) -> SuiteTest:
        if (self.fault is None) == (self.check is None):
            raise ValueError("a test has exactly one of 'fault' or 'check'")
        if not _TEST_ID.match(self.id):
            raise ValueError(f"not a test id: {self.id!r}")
        return self

    @property
    def kind(self) -> str:
        if self.fault is not None:
            return self.fault.kind
        assert self.check is not None
        return self.check.kind


class Suite(Artifact):
    """depdrill.suite/v1."""

    KIND: ClassVar[str] = "suite"
    VERSION: ClassVar[int] = 1

    schema_: str = Field(default="depdrill.suite/v1", alias="schema")
    service: ServiceSpec
    defaults: Defaults = Defaults()
    tests: list[SuiteTest]
    # What the generator left out and why ("x: resolved but never reached").
    notes: list[str] = []

    @model_validator(mode="after")
    def _unique_ids(self) -> Suite:
        ids = [t.id for t in self.tests]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate test id {dupes[0]!r}")
        return self
