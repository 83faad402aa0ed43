"""Which addresses a dependency's name stands for, as the service sees it: what a suite read
from a file may aim a fault at.

A committed suite is untrusted input run as root: an edited address could blackhole
anything. Before it runs, each fault's addresses must be among those its dependency
resolves to from the service's own view: the target's hosts file, then its resolv.conf
name servers, asked from inside the target's namespace (A and AAAA, through CNAME chains,
a few times over so that a round-robin answer shows its whole set). A name that is an
address literal stands for itself.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdatatype

from depdrill.execute.follow import addresses_in
from depdrill.netns import Target, entered

ATTEMPTS = 3  # queries per name and type: a rotating answer shows more of its set
TIMEOUT_S = 2.0
MAX_FILE_BYTES = 1 << 20  # a hosts file is small; a huge one is not read whole


class VouchError(LookupError):
    """The name's addresses cannot be known; the message is one line."""


def etc_files(target: Target) -> tuple[Path, Path]:
    """The resolv.conf and hosts the service reads (the ones `ip netns exec` binds in)."""
    if target.pid is not None:
        etc = Path(f"/proc/{target.pid}/root/etc")
        return etc / "resolv.conf", etc / "hosts"
    own = Path("/etc/netns") / (target.netns or "")

    def pick(name: str) -> Path:
        return own / name if (own / name).exists() else Path("/etc") / name

    return pick("resolv.conf"), pick("hosts")


def _fields(path: Path) -> list[list[str]]:
    """The file's lines as whitespace-separated fields, comments dropped."""
    try:
        with path.open("rb") as handle:
            text = handle.read(MAX_FILE_BYTES).decode("utf-8", "replace")
    except OSError:
        return []
    return [line.split("#", 1)[0].split() for line in text.splitlines()]


def nameservers(resolv_conf: Path) -> list[str]:
    found = []
    for fields in _fields(resolv_conf):
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(fields[1].split("%", 1)[0])))
            except ValueError:
                continue
    return found


def hosts_entries(hosts: Path, name: str) -> set[str]:
    wanted = name.rstrip(".").casefold()
    found = set()
    for fields in _fields(hosts):
        if len(fields) >= 2 and wanted in (f.rstrip(".").casefold() for f in fields[1:]):
            try:
                found.add(str(ipaddress.ip_address(fields[0])))
            except ValueError:
                continue
    return found


@dataclass
class Voucher:
    """Resolves dependency names from inside one target, once per name."""

    target: Target
    attempts: int = ATTEMPTS
    timeout_s: float = TIMEOUT_S
    _known: dict[str, frozenset[str]] = field(default_factory=dict)

    def __call__(self, name: str) -> frozenset[str]:
        """The addresses `name` stands for; raises VouchError when that cannot be known."""
        if name not in self._known:
            self._known[name] = frozenset(self._resolve(name))
        return self._known[name]

    def _resolve(self, name: str) -> set[str]:
        try:
            return {str(ipaddress.ip_address(name))}
        except ValueError:
            pass
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError) as exc:
            raise VouchError(f"not a DNS name ({exc})") from None
        resolv_conf, hosts = etc_files(self.target)
        found = hosts_entries(hosts, name)
        servers = nameservers(resolv_conf)
        if not servers:
            if found:
                return found
            raise VouchError(f"no name server in {resolv_conf} and no entry in {hosts}")
        answered = False
        with entered(self.target):
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                for attempt in range(self.attempts):
                    server = servers[attempt % len(servers)]
                    reply = self._ask(qname, rdtype, server)
                    if reply is not None:
                        answered = True
                        found |= addresses_in(reply, qname)
        if not answered:
            raise VouchError(f"no answer from {', '.join(servers)} within {self.timeout_s:g} s")
        return found

    def _ask(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, server: str
    ) -> dns.message.Message | None:
        query = dns.message.make_query(qname, rdtype)
        try:
            reply = dns.query.udp(query, server, timeout=self.timeout_s)
            if reply.flags & dns.flags.TC:
                reply = dns.query.tcp(query, server, timeout=self.timeout_s)
        except (dns.exception.DNSException, OSError):  # TimeoutError is an OSError
            return None
        return reply
