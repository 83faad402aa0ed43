"""History in SQLite: scans listed and pruned, drift between two graphs, a full disk survived."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from depdrill.daemon.config import ServiceConfig
from depdrill.daemon.drift import diff_scans
from depdrill.daemon.history import History, Outcome
from depdrill.daemon.scan import scan
from depdrill.discover.model import (
    AddressNode,
    AnswerEdge,
    CaptureStats,
    ConnectsEdge,
    EndpointNode,
    Graph,
    NameNode,
    ResolvedEdge,
    ServiceNode,
    address_id,
    endpoint_id,
    name_id,
)
from depdrill.discover.tls.model import ChainReport
from depdrill.errors import InputError
from depdrill.netns import Target

T0 = datetime(2026, 11, 27, 2, 0, tzinfo=UTC)


def _graph(answers: dict[str, str], expiry: datetime, padding: int = 0) -> Graph:
    """A service that looked up each name and connected to its address on 443."""
    nodes: list[object] = [ServiceNode(label="shop")]
    links: list[object] = []
    names = dict(answers) | {f"pad{i}.lab.test": "198.19.9.9" for i in range(padding)}
    for name, address in sorted(names.items()):
        nodes.append(NameNode(id=name_id(name), name=name))
        links.append(ResolvedEdge(source="service", target=name_id(name), count=3, qtypes=["A"]))
        links.append(
            AnswerEdge(source=name_id(name), target=address_id(address), rtype="A", ttl=60)
        )
    for address in sorted(set(names.values())):
        nodes.append(AddressNode(id=address_id(address), address=address, family=4))
        tls = ChainReport(
            host=address, port=443, sni=None, checked=T0, handshake_ok=True,
            earliest_expiry_served=expiry,
        )  # fmt: skip
        endpoint = endpoint_id(address, 443, "tcp")
        nodes.append(EndpointNode(id=endpoint, address=address, port=443, proto="tcp", tls=tls))
        links.append(ConnectsEdge(source="service", target=endpoint, count=2))
    return Graph(
        target="netns shop",
        target_spec=Target(netns="shop"),
        capture=CaptureStats(started=T0, ended=T0 + timedelta(seconds=30), packets=10),
        nodes=nodes,  # type: ignore[arg-type]
        links=links,  # type: ignore[arg-type]
    )


def _record(history: History, graph: Graph | None, when: datetime) -> int:
    return history.record(
        service="shop", started=when, ended=when, outcome=Outcome.COMPLETED, graph=graph
    )


def test_scans_are_listed_pruned_and_compared(tmp_path: Path) -> None:
    # Given two scans: payments moved address and its certificate came nearer expiry,
    # search appeared, legacy went
    before = _graph(
        {"payments.lab.test": "198.19.0.10", "legacy.lab.test": "198.19.0.30"},
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    after = _graph(
        {"payments.lab.test": "198.19.0.11", "search.lab.test": "198.19.0.40"},
        datetime(2026, 12, 1, tzinfo=UTC),
    )
    db = tmp_path / "history.sqlite"
    with History(db) as history:
        first = _record(history, before, T0)
        second = _record(history, after, T0 + timedelta(days=1))
        # When the service's scans are listed
        listed = history.scans("shop")
        # Then both are there, oldest first, with their dependency counts
        assert [(s.id, s.dependencies) for s in listed] == [(first, 2), (second, 2)]
        assert "completed" in listed[0].line()
        # And the stored graph comes back equal
        assert history.load(first).graph == before
    # When the two scans are compared through the file
    drift = diff_scans(db, first, second)
    # Then each kind of change is there
    assert drift.graph.added == ["search.lab.test"]
    assert drift.graph.removed == ["legacy.lab.test"]
    assert [m.name for m in drift.graph.moved] == ["payments.lab.test"]
    assert [e.endpoint for e in drift.graph.nearer_expiry] == ["payments.lab.test:443"]
    assert drift.counts()["dependency-added"] == 1
    assert "+ search.lab.test" in drift.lines()
    # And retention keeps the newest scans only
    with History(db) as history:
        third = _record(history, after, T0 + timedelta(days=2))
        gone = history.prune("shop", keep=2)
        assert [s.id for s in gone] == [first]
        assert [s.id for s in history.scans("shop")] == [second, third]
        assert history.latest("shop", with_results=False) is not None
    with pytest.raises(InputError, match="no scan 999"):
        diff_scans(db, second, 999)


def test_history_command_lists_scans_and_refuses_unknown_services(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite"
    with History(db) as history:
        _record(history, None, T0)
    argv = [sys.executable, "-P", "-m", "depdrill.daemon", "history"]
    listed = subprocess.run([*argv, "shop", "--db", str(db), "--json"], capture_output=True)
    assert listed.returncode == 0, listed.stderr
    assert b'"outcome": "completed"' in listed.stdout
    unknown = subprocess.run([*argv, "nope", "--db", str(db)], capture_output=True, text=True)
    assert unknown.returncode == 2
    assert "no scans of 'nope' (services: shop)" in unknown.stderr


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_history_disk_is_one_log_line_and_recovers(
    tiny_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a history on a 200 KiB disk that something else has filled
    service = ServiceConfig.model_validate(
        {
            "name": "shop",
            "target": {"netns": "ddt-no-such-ns"},
            "probes": ["http://198.19.0.20:8080/health"],
            "schedule": {"cron": "0 2 * * *"},
            "output_dir": str(tmp_path / "out"),
        }
    )
    graph = _graph({"payments.lab.test": "198.19.0.10"}, T0, padding=40)
    history = History(tiny_disk / "history.sqlite")
    filler = tiny_disk / "filler"
    with filler.open("wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
        while True:
            f.write(b"\0" * 4096)
    try:
        # When a scan ends (its target is gone, so it fails fast) and is stored
        with caplog.at_level(logging.WARNING, logger="depdrill.daemon"):
            done = scan(service, graph, None, history, None)
        # Then the scan still comes back, unstored, and the log says so in one line
        assert done.stored.summary.outcome == Outcome.FAILED
        assert done.stored.summary.id == 0
        lines = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
        assert len(lines) == 1 and "full" in lines[0]
        # When the disk has room again, the next scan is stored
        filler.unlink()
        again = scan(service, graph, None, history, None)
        assert again.stored.summary.id > 0
        assert [s.outcome for s in history.scans("shop")] == [Outcome.FAILED]
    finally:
        history.close()


def test_retention_keeps_the_newest_scans(tmp_path: Path) -> None:
    # Given a service that keeps 2 scans, and its target gone (each scan fails fast)
    service = ServiceConfig.model_validate(
        {
            "name": "shop",
            "target": {"netns": "ddt-no-such-ns"},
            "probes": ["http://198.19.0.20:8080/health"],
            "schedule": {"cron": "0 2 * * *"},
            "output_dir": str(tmp_path / "out"),
            "retention": 2,
        }
    )
    with History(tmp_path / "history.sqlite") as history:
        # When it is scanned three times
        ids = [scan(service, None, None, history, None).stored.summary.id for _ in range(3)]
        # Then the two newest remain, each saying why it failed
        kept = history.scans("shop")
    assert [s.id for s in kept] == ids[1:]
    assert all(s.detail == "target not found (netns ddt-no-such-ns)" for s in kept)
