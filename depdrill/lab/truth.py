"""The lab's ground truth: how the demo service must fare under each test depdrill generates.

Written once, here; the integration tests compare depdrill's verdicts with it. Each entry
follows from how depdrill.lab.service treats that dependency (keep the two in step):
- payments: HTTPS, no timeout, critical. Blackholed, requests hang past the probe's 5 s
  timeout (failed). +100 ms per packet costs ~300 ms (TCP, TLS 1.3, HTTP round trips), under
  the 800 ms budget (tolerant); +1000 ms costs ~3 s: answers, too slowly (degraded).
- recommend: HTTPS with a 0.4 s deadline and a fallback: tolerant under every fault.
- cache: redis GET with a 0.2 s deadline and a fallback: tolerant under every fault.
- metrics: a UDP datagram sent after the answer and forgotten: tolerant when blackholed
  (UDP gets no latency tests: nothing waits for it).
- the resolver: every name is resolved per request; with it silent, payments cannot be
  resolved and /health answers 503 after 1 s (failed).
- recommend's leaf certificate expires in 10 days (finding `expiring-soon`, a warning, so
  its cert test is degraded); payments' chain is healthy.
"""

from __future__ import annotations

from depdrill.artifact import Frozen
from depdrill.execute.model import Verdict
from depdrill.generate.model import HttpProbe, Slo, Timing
from depdrill.lab.model import LAB_DOMAIN, LEAF_DAYS, LabState

PAYMENTS = f"payments.{LAB_DOMAIN}"
RECOMMEND = f"recommend.{LAB_DOMAIN}"
CACHE = f"cache.{LAB_DOMAIN}"
METRICS = f"metrics.{LAB_DOMAIN}"

EXPIRY_WARN_DAYS = 14


class LabTruth(Frozen):
    slo: Slo
    timing: Timing
    probe_timeout_s: float
    verdicts: dict[str, Verdict]  # test id -> expected verdict
    cert_findings: dict[str, set[str]]  # "name:port" -> finding codes expected (exactly)
    critical: list[str]  # dependencies whose loss takes the service down

    def probe_for(self, state: LabState) -> HttpProbe:
        """The probe that defines healthy for the lab's demo service."""
        return HttpProbe(url=state.service_url, timeout_s=self.probe_timeout_s)


def _verdicts() -> dict[str, Verdict]:
    tolerant, degraded, failed = Verdict.TOLERANT, Verdict.DEGRADED, Verdict.FAILED
    return {
        f"blackhole:{PAYMENTS}": failed,
        f"latency-100ms:{PAYMENTS}": tolerant,
        f"latency-1000ms:{PAYMENTS}": degraded,
        f"blackhole:{RECOMMEND}": tolerant,
        f"latency-100ms:{RECOMMEND}": tolerant,
        f"latency-1000ms:{RECOMMEND}": tolerant,
        f"blackhole:{CACHE}": tolerant,
        f"latency-100ms:{CACHE}": tolerant,
        f"latency-1000ms:{CACHE}": tolerant,
        f"blackhole:{METRICS}": tolerant,
        "dns:resolver": failed,
        f"cert:{PAYMENTS}:443": tolerant,
        f"cert:{RECOMMEND}:443": degraded,
    }


TRUTH = LabTruth(
    slo=Slo(success_ratio=0.95, p95_ms=800.0, down_ratio=0.5),
    timing=Timing(
        interval_s=0.25, baseline_s=2.0, observe_s=8.0, recovery_s=15.0, max_fault_s=60.0
    ),
    probe_timeout_s=5.0,
    verdicts=_verdicts(),
    cert_findings={f"{PAYMENTS}:443": set(), f"{RECOMMEND}:443": {"expiring-soon"}},
    critical=[PAYMENTS, "resolver"],
)

__all__ = ["EXPIRY_WARN_DAYS", "LEAF_DAYS", "TRUTH", "LabTruth"]
