"""What the run could not see or could not test, and why each gap matters to the reader."""

from __future__ import annotations

from dataclasses import dataclass

from depdrill.discover.model import Graph
from depdrill.execute.model import ErrorReason, Results, Verdict
from depdrill.reports.model import BlindSpotView
from depdrill.reports.text import visible


@dataclass(frozen=True)
class _Kind:
    title: str
    why: str
    fix: str
    penalty: int


# Penalties are the points each gap takes off the blind-spots category (out of 100).
_DISCOVERY: dict[str, _Kind] = {
    "encrypted-dns": _Kind(
        "DNS over TLS or HTTPS in use",
        "Names looked up that way are invisible to discovery, so those dependencies have no tests.",
        "Run discovery where the names are visible (at the DoT/DoH client), or name these "
        "dependencies in the suite by hand.",
        30,
    ),
    "unnamed-flows": _Kind(
        "Connections to addresses that were never resolved",
        "Hard-coded or long-cached addresses cannot be tied to a name: they were not tested.",
        "Give these addresses names in the suite (or call them by name) so they get tests.",
        20,
    ),
    "capture-drops": _Kind(
        "Packets the capture dropped",
        "Some lookups or connections may be missing from the graph and from the tests.",
        "Capture again, longer or under less load, so the graph is complete.",
        15,
    ),
    "unanswered-queries": _Kind(
        "Queries that got no answer",
        "Whatever waits on a name that never answers stalls; that name was not tested.",
        "Find out why these names get no answer (a removed record, a dead zone) and remove "
        "the call or fix the record; give the call a timeout meanwhile.",
        10,
    ),
    "nxdomain-storm": _Kind(
        "Search-path NXDOMAIN storm",
        "Each lookup first tries names that do not exist: extra latency, extra load on the "
        "resolver, and a resolver outage hurts sooner.",
        "Use fully qualified names (a trailing dot) or lower `ndots` in resolv.conf.",
        10,
    ),
    "aggregated-names": _Kind(
        "Names folded under their registered domain",
        "There were too many distinct names to list one by one; individual names were not tested.",
        "Run discovery again with --include for the names that matter.",
        10,
    ),
    "malformed-dns": _Kind(
        "Malformed DNS messages",
        "Messages that could not be parsed may have hidden a dependency.",
        "Look at the examples: malformed answers usually come from a broken resolver or "
        "middlebox on the path.",
        5,
    ),
}
_UNKNOWN_PENALTY = 10
_ERROR_PENALTY, _ERROR_CAP = 10, 40
_SKIP_PENALTY, _SKIP_CAP = 5, 20


def blind_spots(results: Results, graph: Graph | None) -> list[BlindSpotView]:
    spots: list[BlindSpotView] = []
    for spot in graph.blind_spots if graph is not None else []:
        kind = _DISCOVERY.get(str(spot.code))
        spots.append(
            BlindSpotView(
                code=str(spot.code),
                title=kind.title if kind else str(spot.code),
                message=spot.message,
                why=kind.why if kind else "Discovery reported a gap in what it could see.",
                count=spot.count,
                examples=[visible(e, 255) for e in spot.examples[:10]],
                fix=kind.fix if kind else "Look at what discovery reported and widen it.",
                penalty=kind.penalty if kind else _UNKNOWN_PENALTY,
            )
        )
    errored = [t for t in results.tests if t.verdict == Verdict.ERROR]
    if errored:
        spots.append(
            BlindSpotView(
                code="untested",
                title="Tests that could not run",
                message=f"{len(errored)} test(s) ended in an error instead of a verdict.",
                why="How the service copes with these faults is unknown until they run.",
                fix="Fix what stopped them (see each test's reason) and run the suite again.",
                count=len(errored),
                examples=[f"{t.id}: {t.reason or 'error'}" for t in errored[:10]],
                penalty=min(_ERROR_PENALTY * len(errored), _ERROR_CAP),
            )
        )
    skipped = [t for t in results.tests if t.verdict == Verdict.SKIPPED]
    unplanned = [t for t in skipped if t.reason != ErrorReason.SKIPPED_BY_SUITE]
    if skipped:
        spots.append(
            BlindSpotView(
                code="skipped",
                title="Tests that were skipped",
                message=f"{len(skipped)} test(s) were skipped"
                + (f", {len(unplanned)} of them not by the suite's choice." if unplanned else "."),
                why="A skipped test proves nothing about its dependency.",
                fix="Run the skipped tests when it is safe to.",
                count=len(skipped),
                examples=[f"{t.id}: {t.reason or 'skipped'}" for t in skipped[:10]],
                penalty=min(_SKIP_PENALTY * len(unplanned), _SKIP_CAP),
            )
        )
    return spots
