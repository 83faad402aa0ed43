"""Verdicts from sample sequences: the rules of depdrill.execute.verdict, without a network."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from depdrill.execute.model import PhaseName, Sample, Verdict
from depdrill.execute.verdict import (
    MIN_EXPOSED_SAMPLES,
    RECOVERED_AFTER,
    judge,
    observation_settled,
    percentile,
    recovered_at,
    stats,
    tolerance_settled,
)
from depdrill.generate.model import Slo

SLO = Slo(success_ratio=0.95, p95_ms=800, down_ratio=0.5)


def samples(
    pattern: str,
    phase: PhaseName = "observe",
    fast: float = 10,
    slow: float = 1500,
    start: float = 0.0,
) -> list[Sample]:
    """'o' ok and fast, 's' ok but slow, 'x' failed (timeout), one per 0.25 s."""
    out = []
    for i, ch in enumerate(pattern):
        t = start + i * 0.25
        if ch == "x":
            out.append(Sample(t=t, phase=phase, ok=False, error="timeout after 5.0 s"))
        else:
            out.append(Sample(t=t, phase=phase, ok=True, latency_ms=fast if ch == "o" else slow))
    return out


def verdict(observe: str, recovery: str = "ooo") -> Verdict:
    v, _ = judge(
        samples("oooooooo", "baseline"), samples(observe), samples(recovery, "recovery"), SLO
    )
    return v


def test_percentile_is_nearest_rank() -> None:
    # Given 20 latencies 1..20 / When p95 and p50 are taken / Then ranks 19 and 10
    values = [float(v) for v in range(20, 0, -1)]
    assert percentile(values, 95) == 19.0
    assert percentile(values, 50) == 10.0
    assert percentile([7.0], 95) == 7.0


def test_stats_counts_failures_and_uses_only_successful_latencies() -> None:
    # Given 3 fast, 1 slow success and 2 timeouts
    window = stats(samples("ooosxx"))
    # Then the ratio counts all samples, the percentiles only answers that succeeded
    assert (window.samples, window.ok) == (6, 4)
    assert window.success_ratio == pytest.approx(4 / 6)
    assert window.p50_ms == 10 and window.p95_ms == 1500 and window.max_ms == 1500


@pytest.mark.parametrize(
    ("observe", "recovery", "expected"),
    [
        ("o" * 32, "ooo", Verdict.TOLERANT),
        ("o" * 31 + "s", "ooo", Verdict.TOLERANT),  # one slow in 32: p95 (rank 31) is fast
        ("o" * 30 + "ss", "ooo", Verdict.DEGRADED),  # two slow: p95 breaks the budget
        ("o" * 28 + "xxxx", "ooo", Verdict.DEGRADED),  # 87.5% < 95% but above the down ratio
        ("o" * 16 + "x" * 16, "ooo", Verdict.DEGRADED),  # exactly the down ratio: not down
        ("o" * 15 + "x" * 17, "ooo", Verdict.FAILED),
        ("x" * 32, "xxooo", Verdict.FAILED),
        ("x" * 32, "oxoxooxo", Verdict.NO_RECOVERY),  # never 3 healthy in a row
        ("o" * 32, "oossoo", Verdict.NO_RECOVERY),  # slow answers are not healthy
    ],
)
def test_judge(observe: str, recovery: str, expected: Verdict) -> None:
    # Given a healthy baseline and these windows / When judged / Then the expected verdict
    assert verdict(observe, recovery) == expected


def test_rule_sentence_names_the_numbers() -> None:
    # Given a service down under the fault
    v, rule = judge(samples("oooo", "baseline"), samples("xxxo"), samples("ooo", "recovery"), SLO)
    # Then the rule says how many probes succeeded against which threshold
    assert v == Verdict.FAILED
    assert "1/4 probes succeeded (25%)" in rule and "down ratio 50%" in rule
    assert rule.endswith("healthy again 0.5 s after revert")  # 3rd healthy sample, 0.25 s apart


def test_recovery_needs_consecutive_fast_successes_in_time_order() -> None:
    # Given recovery samples that settled out of order
    window = samples("xooxooo", "recovery", start=10.0)
    shuffled: Sequence[Sample] = [window[i] for i in (6, 0, 5, 1, 4, 2, 3)]
    # Then the streak is counted by time: recovered at the third of the final run
    assert recovered_at(shuffled, SLO) == window[6].t
    assert recovered_at(samples("oox"), SLO) is None
    assert RECOVERED_AFTER == 3


def _stops_at(pattern: str, planned: int) -> int | None:
    window = samples(pattern)
    for k in range(1, len(window) + 1):
        if observation_settled(window[:k], planned, SLO):
            return k
    return None


def test_early_stop_when_failed_is_certain() -> None:
    # Given 32 planned samples and a service that fails every probe
    # Then after 17 failures at most 15 can succeed: below the down ratio, stop
    assert _stops_at("x" * 32, 32) == 17


def test_early_stop_when_degraded_is_certain() -> None:
    # Given answers that are all slow: the SLO breaks at the 2nd slow one, but failed vs
    # degraded is only decided once half of the planned samples succeeded
    assert _stops_at("s" * 32, 32) == 16


def test_no_early_stop_while_tolerant_is_possible() -> None:
    # Given a healthy window with one failure (31/32 = 96.9% >= 95%)
    assert _stops_at("o" * 20 + "x" + "o" * 11, 32) is None


def test_early_stop_agrees_with_the_full_window() -> None:
    # Given many mixed windows / When the observation stops early
    # Then judging the truncated window gives the full window's verdict
    import random

    rng = random.Random(7)
    for _ in range(400):
        weights = rng.choice([(90, 5, 5), (60, 20, 20), (30, 10, 60), (5, 5, 90), (50, 50, 0)])
        pattern = "".join(rng.choices("osx", weights=weights, k=32))
        stop = _stops_at(pattern, 32)
        if stop is None:
            continue
        assert verdict(pattern[:stop]) == verdict(pattern), pattern


def test_tolerant_settles_only_after_exposure_and_enough_samples_past_it() -> None:
    # Given an all-fast window whose fault was first met by the service at t = 1.0 s
    window = samples("o" * 32)
    needed = 4 + MIN_EXPOSED_SAMPLES  # samples at t < 1.0 do not count towards it
    # Then it settles exactly when MIN_EXPOSED_SAMPLES samples ran from the exposure on
    assert not tolerance_settled(window[: needed - 1], SLO, exposed_at=1.0)
    assert tolerance_settled(window[:needed], SLO, exposed_at=1.0)
    # And never while the service has not been seen meeting the fault
    assert not tolerance_settled(window, SLO, exposed_at=None)


def test_tolerant_early_stop_needs_every_sample_fast() -> None:
    # Given one failure or one slow answer anywhere in the window, even before exposure
    for pattern in ("x" + "o" * 31, "o" * 20 + "s" + "o" * 11):
        # Then the early tolerant stop is off: the whole window decides
        assert not tolerance_settled(samples(pattern), SLO, exposed_at=0.0)
