"""Every file between stages round-trips, and unknown or newer schemas are refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from depdrill.artifact import atomic_write, load_json, load_yaml, to_json
from depdrill.discover.model import (
    CaptureStats,
    Graph,
    NameNode,
    ResolvedEdge,
    ServiceNode,
)
from depdrill.errors import InputError
from depdrill.execute.model import HostFacts, Results, TestResult, Verdict
from depdrill.generate.model import BlackholeFault, HttpProbe, ServiceSpec, Suite, SuiteTest
from depdrill.netns import Target

T0 = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)


def _graph() -> Graph:
    return Graph(
        target="netns demo",
        target_spec=Target(netns="demo"),
        capture=CaptureStats(started=T0, ended=T0),
        nodes=[ServiceNode(label="demo"), NameNode(id="name:api.test", name="api.test")],
        links=[ResolvedEdge(source="service", target="name:api.test", count=3, qtypes=["A"])],
    )


def _suite() -> Suite:
    return Suite(
        service=ServiceSpec(
            name="demo",
            target=Target(netns="demo"),
            probes=[HttpProbe(url="http://198.18.0.20:8080/health")],
        ),
        tests=[
            SuiteTest(
                id="blackhole:api.test",
                dependency="api.test",
                fault=BlackholeFault(addresses=["198.18.0.10"], ports=[443]),
            )
        ],
    )


def _results() -> Results:
    return Results(
        suite=_suite(),
        host=HostFacts(hostname="h", kernel="6.18"),
        started=T0,
        ended=T0,
        tests=[
            TestResult(
                id="blackhole:api.test",
                kind="blackhole",
                verdict=Verdict.FAILED,
                rule="success ratio 0.00 < 0.50 under the fault",
                started=T0,
                ended=T0,
            )
        ],
    )


@pytest.mark.parametrize("make", [_graph, _suite, _results])
def test_round_trip_through_a_file(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    # Given a model written atomically
    artifact = make()
    path = tmp_path / "file.json"
    atomic_write(path, to_json(artifact))
    # When it is read back
    again = load_json(path, type(artifact))
    # Then it is the same, and no temp file is left beside it
    assert again == artifact
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


@pytest.mark.parametrize("make", [_graph, _suite, _results])
def test_newer_schema_is_refused_with_upgrade_hint(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    artifact = make()
    raw = artifact.dump()
    raw["schema"] = raw["schema"].replace("/v1", "/v7")
    path = tmp_path / "f.json"
    path.write_text(json.dumps(raw, default=str))
    with pytest.raises(InputError, match="upgrade depdrill"):
        load_json(path, type(artifact))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"schema": "depdrill.suite/v1"}', "is a depdrill suite file, expected graph"),
        ('{"schema": "nonsense"}', "unknown schema"),
        ("[1, 2]", "top level is not a mapping"),
        ("{", "not valid JSON"),
        ('{"nodes": []}', "no 'schema' field"),
        ('{"schema": "depdrill.graph/v1", "nodes": "x"}', "at "),
    ],
)
def test_bad_graph_files_give_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "graph.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as caught:
        load_json(path, Graph)
    assert "\n" not in str(caught.value)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_json(tmp_path / "absent.json", Graph)
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="not UTF-8"):
        load_yaml(tmp_path / "bin", Suite)


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    raw = _suite().dump()
    raw["tests"][0]["fault"]["everything"] = True
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(raw, default=str))
    with pytest.raises(InputError, match=r"tests\.0\.fault\.blackhole\.everything"):
        load_json(path, Suite)


def test_no_model_has_a_required_field_that_may_be_none() -> None:
    import typing

    # Artifacts are written without nulls (dump(exclude_none=True)), so a required field
    # that may be None would be dropped on write and refused on read.
    from pydantic import BaseModel

    from depdrill.discover.tls.model import ChainReport

    offenders = []
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [Graph, Suite, Results, ChainReport]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            if field.is_required() and type(None) in typing.get_args(field.annotation):
                offenders.append(f"{model.__name__}.{name}")
            for arg in _model_types(field.annotation):
                todo.append(arg)
    assert offenders == []


def _model_types(annotation: object) -> list[type]:
    import typing

    from pydantic import BaseModel

    found = []
    stack = [annotation]
    while stack:
        current = stack.pop()
        if isinstance(current, type) and issubclass(current, BaseModel):
            found.append(current)
        stack.extend(typing.get_args(current))
    return found
