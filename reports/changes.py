"""What changed since an earlier run: verdicts, tests, dependencies, certificates, score."""

from __future__ import annotations

from depdrill.execute.model import Results, TestResult, Verdict
from depdrill.reports.model import Change
from depdrill.reports.score import dependencies_category

# Better is lower: a move down this list is an improvement.
_RANK = {
    Verdict.NO_RECOVERY: 0,
    Verdict.FAILED: 1,
    Verdict.DEGRADED: 2,
    Verdict.ERROR: 3,
    Verdict.SKIPPED: 3,
    Verdict.TOLERANT: 4,
}


def _earliest_days(test: TestResult) -> float | None:
    if test.tls is None or not test.tls.served:
        return None
    return min(c.days_left for c in test.tls.served)


def _addresses(results: Results) -> dict[str, set[str]]:
    """Per dependency: the addresses its faults were aimed at (where it was found)."""
    out: dict[str, set[str]] = {}
    for test in results.tests:
        if test.dependency and test.fault is not None:
            out.setdefault(test.dependency, set()).update(test.fault.addresses)
    return out


def changes(before: Results, after: Results) -> list[Change]:
    old = {t.id: t for t in before.tests}
    new = {t.id: t for t in after.tests}
    out: list[Change] = []
    for test_id in sorted(old.keys() & new.keys()):
        was, now = old[test_id], new[test_id]
        if was.verdict != now.verdict:
            better = _RANK[now.verdict] > _RANK[was.verdict]
            same_rank = _RANK[now.verdict] == _RANK[was.verdict]
            out.append(
                Change(
                    kind="verdict",
                    subject=test_id,
                    before=was.verdict.value,
                    after=now.verdict.value,
                    better=None if same_rank else better,
                )
            )
        was_days, now_days = _earliest_days(was), _earliest_days(now)
        if was_days is not None and now_days is not None and now_days - was_days > 1:
            out.append(
                Change(
                    kind="certificate",
                    subject=test_id,
                    before=f"{was_days:.0f} days left",
                    after=f"{now_days:.0f} days left (renewed)",
                    better=True,
                )
            )
    for test_id in sorted(new.keys() - old.keys()):
        out.append(Change(kind="test-added", subject=test_id, after=new[test_id].verdict.value))
    for test_id in sorted(old.keys() - new.keys()):
        out.append(Change(kind="test-removed", subject=test_id, before=old[test_id].verdict.value))
    old_deps = {t.dependency for t in before.tests if t.dependency}
    new_deps = {t.dependency for t in after.tests if t.dependency}
    out.extend(Change(kind="dependency-added", subject=d) for d in sorted(new_deps - old_deps))
    out.extend(Change(kind="dependency-removed", subject=d) for d in sorted(old_deps - new_deps))
    # A dependency that moved (a migration, a new load balancer) is tested somewhere else
    # now: say so, neither better nor worse.
    old_addresses, new_addresses = _addresses(before), _addresses(after)
    for name in sorted(old_addresses.keys() & new_addresses.keys()):
        was_at, now_at = old_addresses[name], new_addresses[name]
        if was_at and now_at and was_at != now_at:
            out.append(
                Change(
                    kind="addresses",
                    subject=name,
                    before=", ".join(sorted(was_at)),
                    after=", ".join(sorted(now_at)),
                )
            )
    was_score = dependencies_category(before.tests).score
    now_score = dependencies_category(after.tests).score
    if was_score is not None and now_score is not None and was_score != now_score:
        out.append(
            Change(
                kind="score",
                subject="dependencies tolerated",
                before=str(was_score),
                after=str(now_score),
                better=now_score > was_score,
            )
        )
    return out
