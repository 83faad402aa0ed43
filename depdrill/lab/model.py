"""The lab's layout (names and addresses from a prefix) and the state `lab up` records."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Literal

from depdrill.artifact import Frozen
from depdrill.errors import InputError

STATE_ROOT = Path("/run/depdrill/lab")
NETNS_ETC = Path("/etc/netns")
# A prefix names interfaces (IFNAMSIZ: 15 bytes): `<prefix>-cache` must fit, and no dash
# inside it, so that `ddl` never matches the things of a lab named `ddl-x`.
_PREFIX = re.compile(r"^[a-z][a-z0-9]{1,8}$")
LAB_DOMAIN = "lab.test"

Role = Literal["svc", "dns", "pay", "rec", "cache", "met"]
ROLES: tuple[Role, ...] = ("dns", "pay", "rec", "cache", "met", "svc")
HOST_NUMBER: dict[Role, int] = {"dns": 2, "pay": 10, "rec": 11, "cache": 12, "met": 13, "svc": 20}
SERVICE_PORT = 8080
# Days each HTTPS dependency's leaf certificate is valid for, from `lab up`: recommend's
# falls inside the usual 14-day warning window on purpose (its planted defect).
LEAF_DAYS: dict[str, float] = {f"payments.{LAB_DOMAIN}": 365, f"recommend.{LAB_DOMAIN}": 10}


class LabDependency(Frozen):
    """One thing the demo service calls, as the service names it in DNS."""

    name: str  # the name the service asks DNS for (a test id uses it)
    role: Role
    address: str
    port: int
    proto: Literal["tcp", "udp"]
    tls: bool = False
    cname: str | None = None  # the name the DNS answer points to, when it is an alias


class Layout(Frozen):
    """Every name and address of one lab, derived from its prefix and subnet index."""

    prefix: str
    subnet_index: int

    @classmethod
    def of(cls, prefix: str, subnet_index: int) -> Layout:
        if not _PREFIX.match(prefix):
            raise InputError(
                f"lab prefix {prefix!r}: use 2-9 lowercase letters or digits, "
                "starting with a letter"
            )
        if not 0 <= subnet_index <= 255:
            raise InputError(f"lab subnet index {subnet_index}: use 0-255 (198.18.N.0/24)")
        return cls(prefix=prefix, subnet_index=subnet_index)

    @property
    def subnet(self) -> str:
        return f"198.18.{self.subnet_index}.0/24"

    @property
    def gateway(self) -> str:
        return self.address("svc").rsplit(".", 1)[0] + ".1"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    def netns(self, role: Role) -> str:
        return f"{self.prefix}-{role}"

    def veth(self, role: Role) -> str:
        """The host end of the role's veth (the other end is eth0 in the namespace)."""
        return f"{self.prefix}-{role}"

    def address(self, role: Role) -> str:
        return f"198.18.{self.subnet_index}.{HOST_NUMBER[role]}"

    @property
    def namespaces(self) -> list[str]:
        return [self.netns(r) for r in ROLES]

    @property
    def interfaces(self) -> list[str]:
        return [self.bridge, *(self.veth(r) for r in ROLES)]

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.prefix

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def netns_etc(self) -> Path:
        """The folder `ip netns exec` bind-mounts files from (the service's resolv.conf)."""
        return NETNS_ETC / self.netns("svc")

    @property
    def service_url(self) -> str:
        return f"http://{self.address('svc')}:{SERVICE_PORT}/health"

    @property
    def dependencies(self) -> list[LabDependency]:
        return [
            LabDependency(
                name=f"payments.{LAB_DOMAIN}",
                role="pay",
                address=self.address("pay"),
                port=443,
                proto="tcp",
                tls=True,
            ),
            LabDependency(
                name=f"recommend.{LAB_DOMAIN}",
                role="rec",
                address=self.address("rec"),
                port=443,
                proto="tcp",
                tls=True,
                cname=f"edge-recommend.{LAB_DOMAIN}",
            ),
            LabDependency(
                name=f"cache.{LAB_DOMAIN}",
                role="cache",
                address=self.address("cache"),
                port=6379,
                proto="tcp",
            ),
            LabDependency(
                name=f"metrics.{LAB_DOMAIN}",
                role="met",
                address=self.address("met"),
                port=8125,
                proto="udp",
            ),
        ]

    def dependency(self, role: Role) -> LabDependency:
        return next(d for d in self.dependencies if d.role == role)


class LabState(Frozen):
    """What `lab up` built, written as it goes so that `lab down` can undo a crashed build."""

    prefix: str
    subnet_index: int
    subnet: str
    service_netns: str
    service_url: str
    resolver: str
    ca_bundle: str
    dependencies: list[LabDependency]
    namespaces: list[str] = []
    interfaces: list[str] = []
    pids: dict[str, int] = {}
    files: list[str] = []  # folders it writes: the state dir, /etc/netns/<service netns>
    state_dir: str
    started: datetime
    builder_pid: int
    ready: bool = False  # every server answered and the service's /health returned 200

    @property
    def layout(self) -> Layout:
        return Layout(prefix=self.prefix, subnet_index=self.subnet_index)


class ComponentHealth(Frozen):
    role: str  # svc, dns, pay, rec, cache, met
    name: str
    ok: bool
    detail: str


class LabStatus(Frozen):
    state: LabState
    components: list[ComponentHealth]
    healthy: bool  # the build finished and every component answers now
