"""The lab as a user meets it: names resolve, /health answers, certificates and sinks work."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from depdrill.errors import InputError
from depdrill.lab import world
from depdrill.lab.model import LabState
from depdrill.lab.testing import lab_session, run_prefix


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    """Given a lab built once for this module; removed afterwards, pass or fail."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root for network namespaces")
    with lab_session() as state:
        yield state


def dig(state: LabState, name: str) -> list[str]:
    done = subprocess.run(
        ["dig", f"@{state.resolver}", name, "A", "+short", "+time=1", "+tries=1"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def served_chain(address: str, port: int, sni: str) -> list[x509.Certificate]:
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"{address}:{port}", "-servername", sni, "-showcerts"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=10,
        check=False,
    )
    return x509.load_pem_x509_certificates(done.stdout)


def get_health(state: LabState) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(state.service_url, timeout=5) as answer:
        return answer.status, json.loads(answer.read())


def test_dns_answers_every_name_the_service_uses(lab: LabState) -> None:
    # Given the lab is up
    for dep in lab.dependencies:
        # When its resolver is asked for the dependency's name
        answer = dig(lab, dep.name)
        # Then it answers with the dependency's address (through the alias where there is one)
        assert answer[-1] == dep.address
        if dep.cname:
            assert answer[0] == dep.cname + "."
    # And names outside the lab's records do not exist
    assert dig(lab, "nowhere.lab.test") == []


def test_health_answers_200_from_the_host_using_every_dependency(lab: LabState) -> None:
    # Given the lab is up
    # When the host probes the service
    status, body = get_health(lab)
    # Then payments answered and neither recommend nor the cache fell back
    assert status == 200
    assert body["payments"] == {"service": "payments", "path": "/v1/status", "ok": True}
    assert isinstance(body["recommend"], dict) and body["recommend"]["ok"] is True
    assert body["cache"] == "miss"


def test_recommend_serves_a_valid_chain_that_expires_within_14_days(lab: LabState) -> None:
    # Given the lab's root CA, the only certificate a client is given
    root = x509.load_pem_x509_certificate(Path(lab.ca_bundle).read_bytes())
    now = datetime.now(UTC)
    for name, soon in (("recommend.lab.test", True), ("payments.lab.test", False)):
        dep = next(d for d in lab.dependencies if d.name == name)
        # When the chain the server sends is fetched with the name the service uses
        leaf, *intermediates = served_chain(dep.address, dep.port, name)
        # Then it is leaf + intermediate, verifies to the lab root under web PKI rules
        assert len(intermediates) == 1
        verifier = (
            PolicyBuilder().store(Store([root])).time(now).build_server_verifier(x509.DNSName(name))
        )
        assert verifier.verify(leaf, intermediates)[-1] == root
        # And only recommend's leaf expires within the 14-day warning window
        assert (leaf.not_valid_after_utc - now < timedelta(days=14)) is soon


def test_statsd_sink_receives_the_services_datagrams(lab: LabState) -> None:
    # Given the service answered a health request
    get_health(lab)
    log = Path(lab.state_dir) / "met.log"
    # When the sink's log is read shortly after
    deadline = time.monotonic() + 3
    while b"lab.health.200" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    # Then the datagram the service fired and forgot arrived
    assert b"lab.health.200:1|c" in log.read_bytes()


def test_status_reports_every_component_healthy(lab: LabState) -> None:
    # Given the lab is up
    # When its status is asked
    lab_status = world.status(lab.prefix)
    # Then every component answers and the state is the one `up` returned
    assert lab_status is not None
    assert lab_status.healthy, world.describe_status(lab_status)
    assert {c.role for c in lab_status.components} == {"svc", "dns", "pay", "rec", "cache", "met"}
    assert lab_status.state == lab
    json.dumps(lab_status.model_dump(mode="json"))


def test_up_refuses_a_lab_that_is_already_up(lab: LabState) -> None:
    # Given the lab is up
    # When it is built again with the same prefix
    # Then up refuses with one line naming the command that removes it
    with pytest.raises(world.LabExists, match="lab down"):
        world.up(prefix=lab.prefix, subnet_index=lab.subnet_index)
    assert world.status(lab.prefix) is not None


def test_up_refuses_a_subnet_in_use(lab: LabState) -> None:
    # Given the lab uses its subnet
    other = run_prefix()
    # When another lab is built on the same subnet
    # Then it is refused and leaves nothing behind
    with pytest.raises(world.LabExists, match="already in use"):
        world.up(prefix=other, subnet_index=lab.subnet_index)
    assert world.status(other) is None
    assert not Path(f"/run/netns/{other}-svc").exists()


@pytest.mark.parametrize("prefix", ["", "a", "ddl-x", "DDL", "1ab", "waytoolongx"])
def test_a_bad_prefix_is_refused_in_one_line(prefix: str) -> None:
    # Given a prefix that cannot name interfaces safely
    # When a lab is built or removed with it
    # Then both refuse before touching the host
    with pytest.raises(InputError, match="lab prefix"):
        world.up(prefix=prefix)
    with pytest.raises(InputError, match="lab prefix"):
        world.down(prefix=prefix)
