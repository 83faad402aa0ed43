"""Judging a test from its probe samples: statistics, early stop, recovery and the verdict.

Pure functions over samples, so every rule here is testable without a network.

Definitions, in one place:
- A sample *succeeds* when its probes all answered healthy; it is *fast* when it also
  answered within the SLO's p95 budget. Latency percentiles use the nearest-rank method
  over the latencies of successful samples.
- The SLO holds over a window when success ratio >= slo.success_ratio and the p95 of
  successful samples' latencies <= slo.p95_ms.
- Early stop (observation): with N samples planned and, so far, `ok` successes, `f`
  failures and `slow` successes slower than the budget, the observation stops once
  (a) the SLO can no longer hold over the N samples — (N - f) / N < success_ratio, or
      slow > M - ceil(0.95 M) with M = N - f (then p95 over any final set of successes
      must exceed the budget) — and
  (b) failed vs degraded is decided — ok / N >= down_ratio (never failed) or
      (N - f) / N < down_ratio (always failed).
  Both are conservative: judging only the samples observed so far gives the verdict the
  full window would have given.
- Early stop, tolerant: no count of successes can prove that later samples will not fail,
  so a tolerant observation stops early only on evidence that the service met the fault and
  got past it: the fault's own packet counter rose with the service's traffic (*exposure*,
  measured by the runner after the proof's packets have drained), every sample so far was
  fast, and MIN_EXPOSED_SAMPLES samples were submitted after the exposure and settled (in
  submission order, so a request hanging on the fault holds the decision back). Anything
  less unanimous, or a service that never sends into the fault, gets the whole window.
- Recovery ends at the first run of RECOVERED_AFTER consecutive fast successes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from depdrill.execute.model import Sample, Stats, Verdict
from depdrill.generate.model import Slo

RECOVERED_AFTER = 3
# Samples after the exposure that settle a unanimous tolerant observation: 2 s at the
# default 0.25 s interval. What would turn the verdict shows at once as a slow or hanging
# sample (a timeout, a retry, a full pool), and a hanging one holds the settled prefix back.
MIN_EXPOSED_SAMPLES = 8


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def stats(samples: Sequence[Sample]) -> Stats:
    ok = [s for s in samples if s.ok]
    latencies = [s.latency_ms for s in ok if s.latency_ms is not None]
    return Stats(
        samples=len(samples),
        ok=len(ok),
        success_ratio=len(ok) / len(samples) if samples else 0.0,
        p50_ms=percentile(latencies, 50) if latencies else None,
        p95_ms=percentile(latencies, 95) if latencies else None,
        max_ms=max(latencies) if latencies else None,
    )


def is_fast(sample: Sample, slo: Slo) -> bool:
    return sample.ok and (sample.latency_ms is None or sample.latency_ms <= slo.p95_ms)


def slo_held(window: Stats, slo: Slo) -> bool:
    if window.samples == 0:
        return False
    latency_ok = window.p95_ms is None or window.p95_ms <= slo.p95_ms
    return window.success_ratio >= slo.success_ratio and latency_ok


def observation_settled(samples: Sequence[Sample], planned: int, slo: Slo) -> bool:
    """True once the observation's verdict is certain (see the module docstring)."""
    failures = sum(1 for s in samples if not s.ok)
    ok = len(samples) - failures
    slow = sum(1 for s in samples if s.ok and not is_fast(s, slo))
    best_ok = planned - failures
    slo_broken = best_ok / planned < slo.success_ratio or slow > best_ok - math.ceil(0.95 * best_ok)
    decided = ok / planned >= slo.down_ratio or best_ok / planned < slo.down_ratio
    return slo_broken and decided


def tolerance_settled(samples: Sequence[Sample], slo: Slo, exposed_at: float | None) -> bool:
    """True once a tolerant observation may stop early (see the module docstring).

    `exposed_at` is the sample time at which the service's own traffic was seen meeting
    the fault, or None while it has not been.
    """
    if exposed_at is None or not all(is_fast(s, slo) for s in samples):
        return False
    return sum(1 for s in samples if s.t >= exposed_at) >= MIN_EXPOSED_SAMPLES


def recovered_at(samples: Sequence[Sample], slo: Slo) -> float | None:
    """Time of the first sample that completes RECOVERED_AFTER fast successes in a row."""
    streak = 0
    for sample in sorted(samples, key=lambda s: s.t):
        streak = streak + 1 if is_fast(sample, slo) else 0
        if streak >= RECOVERED_AFTER:
            return sample.t
    return None


def describe(window: Stats) -> str:
    ratio = f"{window.ok}/{window.samples} probes succeeded ({window.success_ratio:.0%})"
    if window.p95_ms is None:
        return ratio
    return f"{ratio}, p95 {window.p95_ms:.0f} ms"


def judge(
    baseline: Sequence[Sample],
    observe: Sequence[Sample],
    recovery: Sequence[Sample],
    slo: Slo,
) -> tuple[Verdict, str]:
    """The verdict of one fault test and the sentence that decided it."""
    before, during = stats(baseline), stats(observe)
    after = recovered_at(recovery, slo)
    context = f"before the fault: {describe(before)}"
    if after is None:
        return Verdict.NO_RECOVERY, (
            f"not healthy after revert: no {RECOVERED_AFTER} healthy probes in a row "
            f"among {len(recovery)} ({describe(stats(recovery))}); under the fault: "
            f"{describe(during)}"
        )
    if during.samples == 0:
        return Verdict.ERROR, "no probe sample completed under the fault"
    reverted = min(s.t for s in recovery)
    healthy = f"healthy again {after - reverted:.1f} s after revert"
    if during.success_ratio < slo.down_ratio:
        return Verdict.FAILED, (
            f"down under the fault: {describe(during)}, below the down ratio "
            f"{slo.down_ratio:.0%}; {context}; {healthy}"
        )
    if not slo_held(during, slo):
        broken = []
        if during.success_ratio < slo.success_ratio:
            broken.append(f"success ratio below {slo.success_ratio:.0%}")
        if during.p95_ms is not None and during.p95_ms > slo.p95_ms:
            broken.append(f"p95 above {slo.p95_ms:.0f} ms")
        return Verdict.DEGRADED, (
            f"SLO broken under the fault ({' and '.join(broken)}): {describe(during)}; "
            f"{context}; {healthy}"
        )
    return Verdict.TOLERANT, f"SLO held under the fault: {describe(during)}; {context}"
