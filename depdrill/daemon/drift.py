"""Drift between two stored scans: the graph's changes and the verdicts that changed."""

from __future__ import annotations

from pathlib import Path

from depdrill.artifact import Frozen
from depdrill.daemon.history import History, StoredScan
from depdrill.errors import InputError
from depdrill.execute.model import Verdict
from depdrill.generate.diff import Diff, diff_graphs


class VerdictChange(Frozen):
    test: str
    before: Verdict | None = None  # None: the test did not run in the earlier scan
    after: Verdict | None = None


class Drift(Frozen):
    service: str
    scan_a: int
    scan_b: int
    graph: Diff = Diff()
    verdicts: list[VerdictChange] = []

    @property
    def changed(self) -> bool:
        return self.graph.changed or bool(self.verdicts)

    def counts(self) -> dict[str, int]:
        """How many changes of each kind (the labels of the drift metric)."""
        return {
            "dependency-added": len(self.graph.added),
            "dependency-removed": len(self.graph.removed),
            "address-moved": len(self.graph.moved),
            "certificate-nearer-expiry": len(self.graph.nearer_expiry),
            "verdict-changed": len(self.verdicts),
        }

    def lines(self) -> list[str]:
        out = self.graph.lines()
        for change in self.verdicts:
            before = change.before.value if change.before else "(not run)"
            after = change.after.value if change.after else "(not run)"
            out.append(f"* {change.test}: {before} -> {after}")
        return out


def drift_between(a: StoredScan, b: StoredScan) -> Drift:
    """What changed from scan `a` to scan `b` (of the same service)."""
    if a.summary.service != b.summary.service:
        raise InputError(
            f"scans {a.summary.id} and {b.summary.id} are of different services "
            f"({a.summary.service}, {b.summary.service})"
        )
    graph = diff_graphs(a.graph, b.graph) if a.graph and b.graph else Diff()
    before = {t.id: t.verdict for t in a.results.tests} if a.results else {}
    after = {t.id: t.verdict for t in b.results.tests} if b.results else {}
    verdicts = [
        VerdictChange(test=test, before=before.get(test), after=after.get(test))
        for test in sorted(before.keys() | after.keys())
        if before.get(test) != after.get(test)
    ]
    return Drift(
        service=a.summary.service,
        scan_a=a.summary.id,
        scan_b=b.summary.id,
        graph=graph,
        verdicts=verdicts,
    )


def diff_scans(db: History | Path, scan_a: int, scan_b: int) -> Drift:
    """`depdrill diff --scan A --scan B`: the drift between two scans in the history."""
    if isinstance(db, History):
        return drift_between(db.load(scan_a), db.load(scan_b))
    if not db.exists():
        raise InputError(f"history {db}: no such file")
    with History(db) as history:
        return drift_between(history.load(scan_a), history.load(scan_b))
