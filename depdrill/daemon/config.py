"""The daemon's TOML config: services, their targets, probes, schedules; validated at load."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import tomllib
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Annotated, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from depdrill.artifact import Frozen, read_text
from depdrill.daemon.cron import Cron, parse_cron
from depdrill.errors import DepdrillError, InputError, TargetError
from depdrill.generate.model import Slo, Timing
from depdrill.generate.planner import parse_latency
from depdrill.netns import Target

_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@\\-]{1,255}$")


class TargetSelector(Frozen):
    """How to find the service's network namespace, again each time it is needed."""

    netns: str | None = None
    pid_file: Path | None = None
    pid: Annotated[int, Field(gt=0)] | None = None
    systemd_unit: Annotated[str, Field(pattern=_UNIT_NAME.pattern)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetSelector:
        given = [v for v in (self.netns, self.pid_file, self.pid, self.systemd_unit) if v]
        if len(given) != 1:
            raise ValueError("give exactly one of netns, pid_file, pid, systemd_unit")
        if self.netns is not None:
            Target(netns=self.netns)  # the same name rules as the command line
        return self

    def describe(self) -> str:
        if self.netns is not None:
            return f"netns {self.netns}"
        if self.pid_file is not None:
            return f"pid file {self.pid_file}"
        if self.systemd_unit is not None:
            return f"systemd unit {self.systemd_unit}"
        return f"pid {self.pid}"

    def resolve(self) -> Target:
        """The namespace as of now; TargetError when it cannot be found."""
        if self.netns is not None:
            target = Target(netns=self.netns)
        elif self.pid is not None:
            target = Target(pid=self.pid)
        else:
            target = Target(pid=self._find_pid())
        target.check()
        return target

    def _find_pid(self) -> int:
        if self.pid_file is not None:
            try:
                text = self.pid_file.read_text().strip()
            except OSError as exc:
                raise TargetError(f"pid file {self.pid_file}: {exc.strerror}") from None
        else:
            done = subprocess.run(
                ["systemctl", "show", "--property=MainPID", "--value", str(self.systemd_unit)],
                capture_output=True,
                text=True,
            )
            text = done.stdout.strip()
        if not text.isdigit() or int(text) == 0:
            raise TargetError(f"{self.describe()}: no running process ({text[:40]!r})")
        return int(text)


class Schedule(Frozen):
    cron: str
    timezone: str = "UTC"
    at_start: bool = False  # also scan once as soon as discovery has warmed up

    @field_validator("cron")
    @classmethod
    def _cron(cls, text: str) -> str:
        try:
            parse_cron(text)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return text

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {name!r}") from None
        return name

    @cached_property
    def parsed(self) -> Cron:
        return parse_cron(self.cron)

    def next_after(self, moment: datetime) -> datetime:
        return self.parsed.next_after(moment, ZoneInfo(self.timezone))


class TestSelection(Frozen):
    """Globs on dependency names, as `depdrill generate --include/--exclude`."""

    __test__: ClassVar[bool] = False  # not a pytest class, despite the name

    include: list[Annotated[str, Field(min_length=1, max_length=253)]] = []
    exclude: list[Annotated[str, Field(min_length=1, max_length=253)]] = []


def _latency(text: str) -> str:
    try:
        parse_latency(text)
    except InputError as exc:
        raise ValueError(str(exc)) from None
    return text


class ServiceConfig(Frozen):
    name: Annotated[str, Field(pattern=_SERVICE_NAME.pattern)]
    target: TargetSelector
    probes: Annotated[
        list[Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)]],
        Field(min_length=1),
    ]
    slo: Slo = Slo()
    timing: Timing = Timing()
    tests: TestSelection = TestSelection()
    latency: Annotated[str, AfterValidator(_latency)] = "100ms,1000ms"
    ca_bundle: Path | None = None
    warn_days: Annotated[int, Field(ge=0, le=3650)] = 30
    schedule: Schedule
    output_dir: Path
    retention: Annotated[int, Field(ge=1, le=100_000)] = 30  # scans kept per service
    # Send the probes' requests during discovery, for a service with no traffic of its own.
    drive: bool = False


def _listen(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: write it as ADDRESS:PORT")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return text


class DaemonSettings(Frozen):
    history: Path = Path("/var/lib/depdrill/history.sqlite")
    metrics_listen: Annotated[str, AfterValidator(_listen)] | None = "127.0.0.1:9464"
    discovery_window_s: Annotated[float, Field(ge=1, le=86_400)] = 300.0
    warmup_s: Annotated[float, Field(ge=0, le=86_400)] = 30.0  # least discovery per scan
    retry_s: Annotated[float, Field(gt=0, le=3600)] = 5.0  # waiting for a namespace to return

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if self.metrics_listen is None:
            return None
        host, _, port = self.metrics_listen.rpartition(":")
        return host.strip("[]"), int(port)


class DaemonConfig(Frozen):
    daemon: DaemonSettings = DaemonSettings()
    services: Annotated[list[ServiceConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_names(self) -> DaemonConfig:
        names = [s.name for s in self.services]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"service names must be unique: {', '.join(twice)}")
        return self

    def service(self, name: str) -> ServiceConfig:
        for service in self.services:
            if service.name == name:
                return service
        raise InputError(f"no service named {name!r} in the config")


def load_config(path: Path) -> DaemonConfig:
    """The config from a TOML file; InputError `FILE: key.path: reason` when it is wrong."""
    text = read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, str(path))


def parse_config(raw: dict[str, object], source: str) -> DaemonConfig:
    try:
        return DaemonConfig.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"{source}: {_describe(exc)}") from None
    except DepdrillError as exc:
        raise InputError(f"{source}: {exc}") from None


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "top level"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "missing (required)"
    more = exc.error_count() - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {message}{tail}"
