"""The probe kinds depdrill knows, in one table, and how a suite's probe spec becomes one."""

from __future__ import annotations

import ssl

from depdrill.errors import InputError
from depdrill.execute.probes.base import Probe
from depdrill.execute.probes.command import CommandProbe
from depdrill.execute.probes.dns import DnsProbe
from depdrill.execute.probes.http import HttpProbe
from depdrill.execute.probes.tcp import TcpProbe
from depdrill.generate.model import CommandProbe as CommandProbeSpec
from depdrill.generate.model import DnsProbe as DnsProbeSpec
from depdrill.generate.model import HttpProbe as HttpProbeSpec
from depdrill.generate.model import Probe as ProbeSpec
from depdrill.generate.model import TcpProbe as TcpProbeSpec

PROBES: dict[str, type[HttpProbe | TcpProbe | DnsProbe | CommandProbe]] = {
    "http": HttpProbe,
    "tcp": TcpProbe,
    "dns": DnsProbe,
    "command": CommandProbe,
}


def make_probe(
    spec: ProbeSpec, allow_commands: bool = False, ca_bundle: str | None = None
) -> Probe:
    """The probe for one spec; a command probe is refused unless commands are allowed."""
    if isinstance(spec, HttpProbeSpec):
        return HttpProbe(spec, tls_context(ca_bundle) if spec.url.startswith("https") else None)
    if isinstance(spec, TcpProbeSpec):
        return TcpProbe(spec)
    if isinstance(spec, DnsProbeSpec):
        return DnsProbe(spec)
    if isinstance(spec, CommandProbeSpec):
        if not allow_commands:
            raise InputError(
                "the suite has a command probe; a suite is untrusted input, "
                "run with --allow-commands to let it run commands"
            )
        return CommandProbe(spec)
    raise InputError(f"unknown probe kind {spec.kind!r} (known: {', '.join(sorted(PROBES))})")


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    if ca_bundle is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise InputError(f"{ca_bundle}: cannot load CA bundle ({exc})") from None
