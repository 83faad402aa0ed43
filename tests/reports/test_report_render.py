"""The page and its JSON: self-contained, linked, compared with an earlier run, fast."""

from __future__ import annotations

import json
import re
import time

from depdrill.discover.model import Graph
from depdrill.execute.model import Results, Verdict
from depdrill.reports.model import ReportModel
from depdrill.reports.render import render_html, report_json
from depdrill.reports.run import ReportOptions, run
from depdrill.reports.svg import graph_layout, timeline
from depdrill.reports.synthetic import many, synthetic_run
from depdrill.reports.text import visible_lines


def test_every_link_on_the_page_has_its_target(lab_run: tuple[Results, Graph]) -> None:
    # Given the lab's report
    html = render_html(*lab_run)
    # When its internal links are gathered
    links = set(re.findall(r'href="#([a-z0-9-]+)"', html))
    ids = set(re.findall(r'id="([a-z0-9-]+)"', html))
    # Then each leads somewhere, and each test and dependency row is linked to
    assert links and links <= ids
    model = run(*lab_run).model
    assert {t.anchor for t in model.tests if t.kind != "cert"} <= links
    assert {v.anchor for v in model.tls} <= links


def test_json_carries_the_same_view_and_reads_back(lab_run: tuple[Results, Graph]) -> None:
    # Given the lab run
    results, graph = lab_run
    # When the report is written as JSON
    data = json.loads(report_json(results, graph))
    # Then it is a depdrill.report/v1 artifact with the page's score, findings and rows
    back = ReportModel.from_raw(data, "report.json")
    html = render_html(results, graph)
    assert data["schema"] == "depdrill.report/v1"
    assert back.score.value is not None and f'<div class="value">{back.score.value}</div>' in html
    assert [f.title for f in back.findings][:1] == [
        "The resolver (198.18.0.2) is a single point of failure: with it silent, /health failed"
    ]
    assert {d.name for d in back.dependencies} == {
        "cache.lab.test",
        "metrics.lab.test",
        "payments.lab.test",
        "recommend.lab.test",
        "DNS resolver 198.18.0.2",
    }
    recommend = next(d for d in back.dependencies if d.name == "recommend.lab.test")
    assert recommend.cnames == ["reco-eu.lab.test"]
    assert recommend.tls[0].days_left == 9
    assert recommend.tls[0].worst == "warn"


def test_run_builds_once_for_html_json_and_junit(lab_run: tuple[Results, Graph]) -> None:
    # Given a JUnit writer handed in by the shell
    def junit(results: Results) -> str:
        return f"<testsuite tests='{len(results.tests)}'/>"

    # When the stage runs
    out = run(*lab_run, ReportOptions(junit=junit))
    # Then HTML, JSON and JUnit come from one view
    assert out.junit == "<testsuite tests='15'/>"
    assert json.loads(out.json)["score"]["value"] == out.model.score.value
    assert out.html.startswith("<!DOCTYPE html>")


def test_without_a_graph_the_suite_supplies_the_dependencies(
    lab_run: tuple[Results, Graph],
) -> None:
    # Given only the results (no graph.json)
    results, _ = lab_run
    # When the report is built
    model = run(results, None).model
    # Then each dependency the suite tested has a row, with the addresses its faults named
    rows = {d.name: d for d in model.dependencies}
    assert rows["payments.lab.test"].addresses == ["198.18.0.10"]
    assert rows["payments.lab.test"].worst == "failed"
    assert rows["DNS resolver 198.18.0.2"].worst == "failed"
    assert model.scan.discovery is None
    # and the TLS facts still come from the certificate tests
    assert {v.endpoint for v in model.tls} == {"payments.lab.test:443", "recommend.lab.test:443"}


def test_previous_run_shows_what_changed(lab_run: tuple[Results, Graph]) -> None:
    # Given an earlier run where payments' blackhole was tolerated and a test that is now gone
    results, graph = lab_run
    earlier = [
        t.model_copy(update={"verdict": Verdict.TOLERANT})
        if t.id == "blackhole:payments.lab.test"
        else t
        for t in results.tests
    ]
    gone = earlier[0].model_copy(
        update={"id": "blackhole:old.lab.test", "dependency": "old.lab.test"}
    )
    previous = results.model_copy(update={"tests": [*earlier, gone]})
    # When the report compares the two
    out = run(results, graph, ReportOptions(previous=previous))
    # Then the regression, the removed test and the dependency that left are listed
    changes = {(c.kind, c.subject): c for c in out.model.changes or []}
    regression = changes[("verdict", "blackhole:payments.lab.test")]
    assert (regression.before, regression.after, regression.better) == (
        "tolerant",
        "failed",
        False,
    )
    assert ("test-removed", "blackhole:old.lab.test") in changes
    assert ("dependency-removed", "old.lab.test") in changes
    assert 'id="changes"' in out.html and "change-worse" in out.html


def test_a_dependency_that_moved_is_listed_with_its_addresses(
    lab_run: tuple[Results, Graph],
) -> None:
    # Given an earlier run in which payments lived at another address (as between two
    # audits of the lab on different subnets), with every verdict the same
    results, graph = lab_run
    earlier = [
        t.model_copy(update={"fault": t.fault.model_copy(update={"addresses": ["198.18.7.10"]})})
        if t.dependency == "payments.lab.test" and t.fault is not None
        else t
        for t in results.tests
    ]
    previous = results.model_copy(update={"tests": earlier})
    # When the report compares the two
    changes = run(results, graph, ReportOptions(previous=previous)).model.changes or []
    # Then the move is the only change, neither better nor worse
    assert [(c.kind, c.subject, c.before, c.after, c.better) for c in changes] == [
        ("addresses", "payments.lab.test", "198.18.7.10", "198.18.0.10", None)
    ]


def test_timeline_shades_the_fault_and_marks_each_failure(
    lab_run: tuple[Results, Graph],
) -> None:
    # Given payments' blackhole test: probes fail while the fault is on
    results, _ = lab_run
    test = next(t for t in results.tests if t.id == "blackhole:payments.lab.test")
    # When its timeline is laid out
    drawing = timeline(test.samples, test.phases, 800.0)
    assert drawing is not None
    # Then the fault window runs from apply to the end of revert, one mark per failed probe
    spans = {s.label: s for s in drawing.spans}
    plot_end = drawing.left + drawing.plot_w
    t_end = test.phases[-1].ended
    apply = next(p for p in test.phases if p.name == "apply")
    revert = next(p for p in test.phases if p.name == "revert")
    fault = spans["fault on"]
    assert abs(fault.x - (drawing.left + drawing.plot_w * apply.started / t_end)) < 0.1
    assert abs(fault.x + fault.w - (drawing.left + drawing.plot_w * revert.ended / t_end)) < 0.1
    assert set(spans) == {"baseline", "fault on", "recovery"}
    assert spans["recovery"].x + spans["recovery"].w <= plot_end + 0.1
    failed = sum(1 for s in test.samples if not s.ok)
    assert drawing.failures.count("M") == failed == drawing.fail_count
    assert (
        drawing.budget_y is not None
        and drawing.top < drawing.budget_y < drawing.top + drawing.plot_h
    )


def test_an_empty_run_still_renders() -> None:
    # Given a run with no tests at all (everything filtered out)
    results, _ = synthetic_run([])
    results = results.model_copy(update={"tests": []})
    # When the page is rendered without a graph
    html = render_html(results, None)
    # Then it says so instead of failing
    assert "No tests ran." in html
    assert "not measured" in html


def test_fifty_dependencies_render_fast_and_small() -> None:
    # Given a 50-dependency run (about 150 tests, 80 probe samples each)
    results, graph = synthetic_run(many(50))
    # When it is rendered
    began = time.perf_counter()
    html = render_html(results, graph)
    elapsed = time.perf_counter() - began
    # Then it takes under a second and stays under 2 MB
    assert elapsed < 1.0, elapsed
    assert len(html.encode()) < 2_000_000


def test_graph_layout_keeps_every_box_inside_and_apart() -> None:
    # Given 50 dependencies, one with a 3-step CNAME chain and 7 endpoints
    rows = run(*synthetic_run(many(50))).model.dependencies
    wide = rows[0].model_copy(
        update={
            "cnames": ["a.cdn.test", "b.cdn.test", "c.cdn.test"],
            "endpoints": [f"198.18.2.{i}:443/tcp" for i in range(7)],
        }
    )
    # When the graph is laid out
    drawing = graph_layout([wide, *rows[1:]], "svc")
    # Then no two boxes overlap, all lie inside the drawing, and long lists are folded
    boxes = drawing.boxes
    for box in boxes:
        assert box.x >= 0 and box.x + box.w <= drawing.width
        assert box.y >= 0 and box.y + box.h <= drawing.height
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            apart = a.x + a.w <= b.x or b.x + b.w <= a.x or a.y + a.h <= b.y or b.y + b.h <= a.y
            assert apart, (a.label, b.label)
    labels = [b.label for b in boxes]
    assert "+3 more" in labels
    assert "… +1 → c.cdn.test" in labels
    # one lane per dependency (and the resolver), each edge from the service to one of them
    assert sum(1 for e in drawing.edges if e.cls.startswith("e-dep")) == len(rows)


def test_rules_keep_their_lines_but_not_their_tricks() -> None:
    # Given an nft ruleset with its own layout, and a name inside it that carries a
    # right-to-left override and a NUL
    rules = 'table netdev t {\n\tset s {\n\t\telements = { "a\u202eb\x00" }\n\t}\n}'
    # When it is made visible for a <pre>
    shown = visible_lines(rules)
    # Then the line breaks and tabs stay, the override and the NUL are spelled out
    assert shown.splitlines()[1] == "\tset s {"
    assert "a<U+202E>b<U+0000>" in shown


def test_the_discovery_line_says_how_packets_came_in(lab_run: tuple[Results, Graph]) -> None:
    # Given a graph captured with the packet socket because nflog could not be used
    results, graph = lab_run
    capture = graph.capture.model_copy(
        update={"tap": "packet", "tap_fallback": "NFQUEUE queue 7 is bound in this namespace"}
    )
    fallback = graph.model_copy(update={"capture": capture})
    # When the report is built, and again from a graph captured through nflog
    line = run(results, fallback).model.scan.discovery
    nflog = graph.model_copy(
        update={"capture": capture.model_copy(update={"tap": "nflog", "tap_fallback": ""})}
    )
    plain = run(results, nflog).model.scan.discovery
    # Then the discovery line names the tap, and why the first was not nflog
    assert line is not None and line.endswith(
        "captured through a packet socket (nflog could not be used: NFQUEUE queue 7 is bound "
        "in this namespace)"
    )
    assert plain is not None and plain.endswith(
        "captured through nft rules logging to an NFLOG group"
    )


def test_the_discovery_line_gives_each_earlier_taps_reason(lab_run: tuple[Results, Graph]) -> None:
    # Given a graph captured with the packet socket after both kernel taps were refused
    results, graph = lab_run
    capture = graph.capture.model_copy(
        update={
            "tap": "packet",
            "tap_fallback": "ebpf: this kernel has no tcx links (Linux 6.6 and later have "
            "them); nflog: NFQUEUE queue 7 is bound in this namespace",
        }
    )
    # When the report is built
    line = run(results, graph.model_copy(update={"capture": capture})).model.scan.discovery
    # Then it names the tap, and each earlier tap with its own reason
    assert line is not None and line.endswith(
        "captured through a packet socket (ebpf could not be used: this kernel has no tcx "
        "links (Linux 6.6 and later have them); nflog could not be used: NFQUEUE queue 7 is "
        "bound in this namespace)"
    )
