"""suite.yaml: exact bytes for a fixed graph, and what is written reads back unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jsonschema
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depdrill.discover.model import Graph
from depdrill.generate import planner, suitefile
from depdrill.generate.model import Slo, Suite
from depdrill.generate.planner import GenerateOptions, options_from_cli

NAMES = ["api.payments.lab.test", "cache.lab.test", "statsd.lab.test", "v6.lab.test"]


def test_fixed_graph_gives_exact_suite_bytes(
    graph: Graph, options: GenerateOptions, golden: Callable[[str, str], None]
) -> None:
    # Given the shop graph
    # When the suite is written
    text = suitefile.dump_suite(planner.run(graph, options))
    # Then it is byte for byte the reviewed golden file
    golden("suite.golden.yaml", text)


def test_every_test_has_a_comment_saying_what_and_why(
    graph: Graph, options: GenerateOptions
) -> None:
    text = suitefile.dump_suite(planner.run(graph, options))
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("- id: "):
            test_id = line.removeprefix("- id: ")
            comments = []
            back = index - 1
            while lines[back].startswith("#"):
                comments.insert(0, lines[back])
                back -= 1
            assert comments[0].startswith(f"# {test_id}: "), test_id
            assert any(c.startswith("# why: ") for c in comments), test_id


def test_dump_then_load_gives_the_same_suite(
    graph: Graph, options: GenerateOptions, tmp_path: Path
) -> None:
    # Given a generated suite written to a file
    suite = planner.run(graph, options)
    path = tmp_path / "suite.yaml"
    path.write_text(suitefile.dump_suite(suite), encoding="utf-8")
    # When it is loaded strictly
    # Then it is the same model, and writing it again gives the same bytes
    loaded = suitefile.load_suite(path)
    assert loaded == suite
    assert suitefile.dump_suite(loaded) == path.read_text(encoding="utf-8")


def test_a_hostile_note_cannot_escape_its_comment(graph: Graph, options: GenerateOptions) -> None:
    # Given a note (person-written) with a newline and YAML after it
    suite = planner.run(graph, options)
    hostile = "fine\nschema: depdrill.suite/v9\n# "
    edited = suite.model_copy(update={"notes": [hostile]})
    # Then the file still reads back to exactly that note, and nothing else
    assert suitefile.parse_suite(suitefile.dump_suite(edited), "s.yaml").notes == [hostile]


def test_published_json_schema_accepts_a_generated_suite(
    graph: Graph, options: GenerateOptions
) -> None:
    # Given the published JSON Schema
    schema = suitefile.suite_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    # Then a generated suite validates, and one with an unknown key does not
    raw = yaml.safe_load(suitefile.dump_suite(planner.run(graph, options)))
    jsonschema.validate(raw, schema)
    raw["colour"] = "red"
    assert not jsonschema.Draft202012Validator(schema).is_valid(raw)


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    drop=st.sets(st.sampled_from(NAMES)),
    ladder=st.lists(st.integers(1, 60_000), max_size=4),
    jitter=st.integers(0, 500),
    exclude=st.lists(st.sampled_from(["cache*", "*.test", "v6.*", "nomatch"]), max_size=2),
    extra=st.lists(st.ip_addresses(v=4).map(str), max_size=3),
    service=st.text(min_size=1, max_size=30),
)
def test_any_generated_suite_loads_back_unchanged(
    make_graph: Callable[..., Graph],
    options: GenerateOptions,
    drop: set[str],
    ladder: list[int],
    jitter: int,
    exclude: list[str],
    extra: list[str],
    service: str,
) -> None:
    # Given a graph with some names gone, more addresses, any ladder and filters, and any
    # service name (free text a person chose)
    graph = make_graph(drop=drop, extra_answers={"cache.lab.test": extra})
    chosen = options.model_copy(
        update={
            "latency_ms": sorted(set(ladder)),
            "jitter_ms": jitter,
            "exclude": exclude,
            "service_name": service,
        }
    )
    suite = planner.run(graph, chosen)
    # Then what is written reads back to the same model
    assert suitefile.parse_suite(suitefile.dump_suite(suite), "suite.yaml") == suite


edits = st.fixed_dictionaries(
    {
        "skip": st.booleans(),
        "note": st.none() | st.text(max_size=40),
        "slo": st.none()
        | st.builds(
            Slo,
            success_ratio=st.floats(0, 1),
            p95_ms=st.floats(1, 10_000),
            down_ratio=st.floats(0, 1),
        ),
    }
)


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data(), drop=st.sets(st.sampled_from(NAMES), max_size=2))
def test_regeneration_keeps_every_edit(
    make_graph: Callable[..., Graph],
    options: GenerateOptions,
    data: st.DataObject,
    drop: set[str],
) -> None:
    # Given a suite a person edited (skips, notes, per-test SLOs, a tighter service SLO),
    # written and read back as it would be from a repository
    suite = planner.run(make_graph(), options)
    changed = {}
    for test in suite.tests:
        if data.draw(st.booleans()):
            changed[test.id] = data.draw(edits)
    edited = suite.model_copy(
        update={
            "tests": [t.model_copy(update=changed.get(t.id, {})) for t in suite.tests],
            "service": suite.service.model_copy(update={"slo": Slo(p95_ms=321.0)}),
        }
    )
    edited = suitefile.parse_suite(suitefile.dump_suite(edited), "old.yaml")
    # When it is regenerated from a rescan where some dependencies are gone
    fresh = planner.regenerate(make_graph(drop=drop), edited, options_from_cli(previous=edited))
    # Then every edit survives, on tests that stayed and on edited tests whose dependency went
    after = {t.id: t for t in fresh.tests}
    for test_id, edit in changed.items():
        person_edited = bool(edit["skip"] or edit["note"] or edit["slo"] is not None)
        if test_id not in after:
            assert not person_edited, test_id
            continue
        test = after[test_id]
        assert (test.skip, test.note, test.slo) == (edit["skip"], edit["note"], edit["slo"])
        assert test.removed == (test.dependency in drop and person_edited)
    assert fresh.service.slo == Slo(p95_ms=321.0)
    # And unedited tests of gone dependencies are gone, new output loads back unchanged
    assert not any(t.dependency in drop and t.id not in changed for t in fresh.tests)
    assert suitefile.parse_suite(suitefile.dump_suite(fresh), "new.yaml") == fresh


def test_regeneration_adds_new_dependencies(
    make_graph: Callable[..., Graph], options: GenerateOptions
) -> None:
    # Given a suite from a scan before the cache existed
    old = planner.run(make_graph(drop={"cache.lab.test"}), options)
    assert not any(t.dependency == "cache.lab.test" for t in old.tests)
    # When it is regenerated from a scan that sees it
    fresh = planner.regenerate(make_graph(), old, options_from_cli(previous=old))
    # Then the cache's tests are added and nothing is marked removed
    assert "blackhole:cache.lab.test" in {t.id for t in fresh.tests}
    assert not any(t.removed for t in fresh.tests)


def test_loaded_suite_is_a_suite(graph: Graph, options: GenerateOptions) -> None:
    assert isinstance(
        suitefile.parse_suite(suitefile.dump_suite(planner.run(graph, options)), "x"), Suite
    )
