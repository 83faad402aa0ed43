"""The score: categories, weights, the bands, and categories that drop out."""

from __future__ import annotations

from depdrill.discover.model import Graph
from depdrill.execute.model import Results, Verdict
from depdrill.reports.build import build
from depdrill.reports.score import band
from depdrill.reports.synthetic import Behaviour, synthetic_run


def test_bands_follow_gremlins_thresholds() -> None:
    # Given scores at and around the band edges
    # Then above 70 is good, 50 to 70 fair, below 50 poor
    assert [band(v) for v in (100, 71, 70, 50, 49, 0)] == [
        "good",
        "good",
        "fair",
        "fair",
        "poor",
        "poor",
    ]


def test_lab_score_weighs_each_dependency_by_its_worst_test(
    lab_run: tuple[Results, Graph],
) -> None:
    # Given the lab: payments and the resolver take the service down, the rest tolerate
    results, graph = lab_run
    # When the report is built
    score = build(results, graph).score
    cats = {c.key: c for c in score.categories}
    # Then 3 of 5 dependencies earn full credit, 1 of 2 certificates a warning's half,
    # one blind spot costs 10; the weighted total lands in "fair"
    assert cats["dependencies"].score == 60
    assert cats["certificates"].score == 75
    assert cats["blind-spots"].score == 90
    assert score.value == round((60 * 60 + 25 * 75 + 15 * 90) / 100)
    assert score.band == "fair"


def test_unmeasured_categories_drop_out_of_the_total() -> None:
    # Given a run with no TLS endpoint and no graph
    behaviours = [Behaviour("cache.lab.test", "198.18.0.12", 6379, timeout_ms=100)]
    results, _ = synthetic_run(behaviours)
    results = results.model_copy(
        update={"tests": [t for t in results.tests if t.kind != "dns-blackhole"]}
    )
    # When the report is built without the graph
    score = build(results, None).score
    cats = {c.key: c for c in score.categories}
    # Then certificates are "not measured" and the total is the mean of the rest
    assert cats["certificates"].score is None
    assert cats["dependencies"].score == 100
    assert cats["blind-spots"].score == 100
    assert "No discovery graph was given" in cats["blind-spots"].detail
    assert score.value == 100
    assert score.band == "good"


def test_errors_cost_blind_spot_points_and_earn_no_dependency_credit(
    lab_run: tuple[Results, Graph],
) -> None:
    # Given the lab run where every fault test ended in an error instead
    results, graph = lab_run
    errored = [
        t.model_copy(update={"verdict": Verdict.ERROR}) if t.kind != "cert" else t
        for t in results.tests
    ]
    # When the report is built
    score = build(results.model_copy(update={"tests": errored}), graph).score
    cats = {c.key: c for c in score.categories}
    # Then no dependency is scored, and the blind spots lose the untested tests' points
    assert cats["dependencies"].score is None
    assert cats["blind-spots"].score == 100 - 10 - 40
    assert score.value == round((25 * 75 + 15 * 50) / 40)
