"""Diffs between scans: what a reviewer or a CI job needs to notice."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from depdrill.artifact import to_json
from depdrill.discover.model import EndpointNode, Graph
from depdrill.errors import InputError
from depdrill.generate import planner, suitefile
from depdrill.generate.diff import Footprint, diff_files, diff_graphs, diff_suites
from depdrill.generate.planner import GenerateOptions


def test_the_same_graph_has_no_changes(graph: Graph, options: GenerateOptions) -> None:
    assert not diff_graphs(graph, graph).changed
    suite = planner.run(graph, options)
    assert not diff_suites(suite, suite).changed
    assert diff_graphs(graph, graph).lines() == []


def test_graph_diff_finds_added_gone_and_moved(make_graph: Callable[..., Graph]) -> None:
    # Given a scan without the cache, and a later one with the cache and a moved statsd
    before = make_graph(drop={"cache.lab.test"})
    after = make_graph(drop={"unused.lab.test"}, extra_answers={"statsd.lab.test": ["198.18.0.31"]})
    # When they are compared
    diff = diff_graphs(before, after)
    # Then the cache is added, the unused name gone, statsd moved to a second address
    assert diff.added == ["cache.lab.test"]
    assert diff.removed == ["unused.lab.test"]
    assert [m.name for m in diff.moved] == ["statsd.lab.test"]
    assert diff.moved[0].before == Footprint(addresses=["198.18.0.30"], ports=[8125])
    assert diff.moved[0].after == Footprint(addresses=["198.18.0.30", "198.18.0.31"], ports=[8125])
    assert diff.lines() == [
        "+ cache.lab.test",
        "- unused.lab.test",
        "~ statsd.lab.test: 198.18.0.30 port 8125 -> 198.18.0.30 198.18.0.31 port 8125",
    ]


def test_graph_diff_finds_a_certificate_nearer_expiry(graph: Graph) -> None:
    # Given a rescan where the API now serves a certificate expiring sooner
    sooner = datetime(2026, 12, 1, tzinfo=UTC)
    nodes = [
        n.model_copy(update={"tls": n.tls.model_copy(update={"earliest_expiry_served": sooner})})
        if isinstance(n, EndpointNode) and n.tls is not None
        else n
        for n in graph.nodes
    ]
    later = graph.model_copy(update={"nodes": nodes})
    diff = diff_graphs(graph, later)
    # Then the diff names the endpoint and both dates; the reverse direction is no news
    assert [(e.endpoint, e.after) for e in diff.nearer_expiry] == [
        ("api.payments.lab.test:443", sooner)
    ]
    assert "! api.payments.lab.test:443: expires 2026-12-01 (was 2026-12-08)" in diff.lines()
    assert diff_graphs(later, graph).nearer_expiry == []


def test_suite_diff_lists_tests_and_dependencies(
    make_graph: Callable[..., Graph], options: GenerateOptions
) -> None:
    old = planner.run(make_graph(), options)
    new = planner.run(make_graph(drop={"v6.lab.test"}), options)
    diff = diff_suites(old, new)
    assert diff.removed == ["v6.lab.test"] and diff.added == []
    assert diff.tests_removed == [
        "blackhole:v6.lab.test",
        "latency-1000ms:v6.lab.test",
        "latency-100ms:v6.lab.test",
    ]
    assert diff.changed


def test_diff_files_tells_graphs_from_suites(
    make_graph: Callable[..., Graph], options: GenerateOptions, tmp_path: Path
) -> None:
    # Given two graphs and two suites on disk
    old_graph, new_graph = make_graph(drop={"cache.lab.test"}), make_graph()
    files = {
        "old.json": to_json(old_graph),
        "new.json": to_json(new_graph),
        "old.yaml": suitefile.dump_suite(planner.run(old_graph, options)),
        "new.yaml": suitefile.dump_suite(planner.run(new_graph, options)),
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    # Then each pair diffs by its kind, and a mixed pair is refused
    assert diff_files(tmp_path / "old.json", tmp_path / "new.json").added == ["cache.lab.test"]
    suites = diff_files(tmp_path / "old.yaml", tmp_path / "new.yaml")
    assert suites.added == ["cache.lab.test"] and "blackhole:cache.lab.test" in suites.tests_added
    with pytest.raises(InputError, match="compare like with like"):
        diff_files(tmp_path / "old.json", tmp_path / "new.yaml")
    (tmp_path / "junk.yaml").write_text("tests: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        diff_files(tmp_path / "junk.yaml", tmp_path / "new.yaml")
