"""A suite read from a file may aim faults only at what its dependencies resolve to, as the
service sees it: a real name server in one namespace, the service's resolv.conf and hosts
file as `ip netns exec` binds them, and `depdrill run` refusing an edited address."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest
from execute_servers import dns_server

from depdrill.errors import InputError
from depdrill.execute.vouch import Voucher, VouchError, hosts_entries, nameservers
from depdrill.generate.model import BlackholeFault, HttpProbe, ServiceSpec, Suite, SuiteTest
from depdrill.generate.suitefile import dump_suite, refuse_unvouched
from depdrill.netns import Target
from depdrill.testing import ScratchNet

NAME = "api.vouch.test"


def zone(net: ScratchNet) -> Callable[[dns.message.Message], dns.message.Message | None]:
    """api.vouch.test -> CNAME edge.vouch.test -> .3 and .4; quiet.vouch.test never answered."""

    def answer(query: dns.message.Message) -> dns.message.Message | None:
        qname = query.question[0].name
        rdtype = query.question[0].rdtype
        if str(qname).startswith("quiet"):
            return None
        reply = dns.message.make_response(query)
        if str(qname) == f"{NAME}.":
            reply.answer.append(dns.rrset.from_text(qname, 60, "IN", "CNAME", "edge.vouch.test."))
            if rdtype == dns.rdatatype.A:
                edge = [net.address(3), net.address(4)]
                reply.answer.append(dns.rrset.from_text("edge.vouch.test.", 60, "IN", "A", *edge))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        return reply

    return answer


@dataclass
class View:
    net: ScratchNet
    service: Target
    etc: Path


@pytest.fixture
def view(scratch_net: ScratchNet) -> Iterator[View]:
    # Given a service namespace whose resolv.conf names a real name server in another one
    dns_ns = scratch_net.add("dns", 53)
    service_ns = scratch_net.add("svc", 2)
    etc = Path("/etc/netns") / service_ns
    etc.mkdir(parents=True)
    try:
        (etc / "resolv.conf").write_text(f"# per-run\nnameserver {scratch_net.address(53)}\n")
        (etc / "hosts").write_text(f"{scratch_net.address(7)} pinned.vouch.test  # alias\n")
        with dns_server(zone(scratch_net), scratch_net.address(53), target=Target(netns=dns_ns)):
            yield View(scratch_net, Target(netns=service_ns), etc)
    finally:
        shutil.rmtree(etc)


def test_names_resolve_as_the_service_sees_them(view: View) -> None:
    vouch = Voucher(view.service, timeout_s=0.5)
    # Then a CNAME chain gives its final addresses, the hosts file is honoured, an address
    # literal stands for itself, and a name that does not exist stands for nothing
    assert vouch(NAME) == {view.net.address(3), view.net.address(4)}
    assert vouch("pinned.vouch.test") == {view.net.address(7)}
    assert vouch("198.19.0.99") == {"198.19.0.99"}
    assert vouch("gone.vouch.test") == frozenset()
    # And a resolver that never answers is a reason, not an empty answer
    with pytest.raises(VouchError, match=r"no answer from 198\.19\.\d+\.53 within 0\.5 s"):
        vouch("quiet.vouch.test")


def test_hostile_files_and_names_are_read_safely(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_bytes(
        b"nameserver not-an-ip\nnameserver 198.19.0.53 # ok\n\xff\xfe\x00\nnameserver\n"
    )
    hosts = tmp_path / "hosts"
    hosts.write_bytes(
        b"<script> api.test\n198.19.0.7 API.Test. other\n::1 api.test\n#198.19.0.8 api.test\n"
    )
    assert nameservers(resolv) == ["198.19.0.53"]
    assert hosts_entries(hosts, "api.test") == {"198.19.0.7", "::1"}
    assert nameservers(tmp_path / "missing") == []
    with pytest.raises(VouchError, match="not a DNS name"):
        Voucher(Target(netns="ddt-unused"))("a" * 64 + ".test")


def suite_file(view: View, path: Path, addresses: list[str], dependency: str = NAME) -> Path:
    suite = Suite(
        service=ServiceSpec(
            name="shop",
            target=view.service,
            probes=[HttpProbe(url=f"http://{view.net.address(2)}:8080/health")],
        ),
        tests=[
            SuiteTest(
                id=f"blackhole:{dependency}",
                dependency=dependency,
                fault=BlackholeFault(addresses=addresses, ports=[443], protocols=["tcp"]),
            )
        ],
    )
    path.write_text(dump_suite(suite))
    return path


def depdrill_run(suite: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-P", "-m", "depdrill.cli", "run", str(suite), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_run_refuses_an_address_the_dependency_does_not_resolve_to(
    view: View, tmp_path: Path
) -> None:
    # Given a committed suite whose blackhole was edited to add an address of the probe path
    edited = suite_file(view, tmp_path / "suite.yaml", [view.net.address(3), view.net.address(2)])
    line = next(
        n
        for n, text in enumerate(edited.read_text().splitlines(), 1)
        if text.strip() == f"- {view.net.address(2)}"
    )
    # When it is run
    done = depdrill_run(edited, "-o", str(tmp_path / "results.json"))
    # Then it is refused before anything runs: exit 2, one line naming file, line and reason
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        f"{edited}:{line}: tests[0].fault.addresses[1]: {view.net.address(2)} is not an address "
        f"of '{NAME}' (from the service's namespace it resolves to {view.net.address(3)}, "
        f"{view.net.address(4)})"
    ) in done.stderr
    assert not (tmp_path / "results.json").exists()
    tables = view.net.exec(view.service.netns or "", "nft", "list", "tables").stdout
    assert "depdrill" not in tables


def test_run_accepts_what_the_name_resolves_to(view: View, tmp_path: Path) -> None:
    # Given the suite as generated: both addresses the name resolves to
    good = suite_file(view, tmp_path / "suite.yaml", [view.net.address(4), view.net.address(3)])
    # When it is dry-run
    done = depdrill_run(good, "--dry-run", "-o", str(tmp_path / "results.json"))
    # Then it passes the check and prints the rules it would install
    assert done.returncode == 0, done.stderr
    assert f"# blackhole:{NAME}" in done.stdout and view.net.address(3) in done.stdout


def test_run_refuses_a_dependency_it_cannot_resolve(view: View, tmp_path: Path) -> None:
    # Given a test on a name the service's resolver never answers
    quiet = suite_file(view, tmp_path / "suite.yaml", [view.net.address(3)], "quiet.vouch.test")
    done = depdrill_run(quiet, "--dry-run", "-o", str(tmp_path / "results.json"))
    # Then the refusal says why the addresses cannot be vouched for
    assert done.returncode == 2, done.stderr
    assert "tests[0].dependency: cannot tell what 'quiet.vouch.test' resolves to" in done.stderr
    assert "no answer from" in done.stderr
    # And a test that will not run is not checked: skipped here
    quiet.write_text(quiet.read_text().replace("  skip: false\n", "  skip: true\n"))
    skipped = depdrill_run(quiet, "--dry-run", "-o", str(tmp_path / "results.json"))
    assert skipped.returncode == 0, skipped.stderr


def test_a_fault_without_its_dependency_is_refused(tmp_path: Path) -> None:
    # Given a hand-written fault test that does not say whose addresses it aims at
    suite = Suite(
        service=ServiceSpec(
            name="shop", target=Target(netns="ddt-unused"), probes=[HttpProbe(url="http://x/")]
        ),
        tests=[SuiteTest(id="blackhole:anything", fault=BlackholeFault(addresses=["198.19.0.9"]))],
    )
    text = dump_suite(suite)
    # Then nothing can vouch for it: refused at its line, before any lookup
    with pytest.raises(InputError, match=r"^suite.yaml:\d+: tests\[0\]: a fault needs the dep"):
        refuse_unvouched(
            text, "suite.yaml", suite, lambda name: frozenset(), ["blackhole:anything"]
        )
