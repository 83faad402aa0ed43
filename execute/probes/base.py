"""The probe protocol: run(deadline) -> Observation. A probe defines 'healthy'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Observation:
    ok: bool
    latency_ms: float | None  # None when no answer came at all
    error: str | None = None  # one line, e.g. "timeout after 5.0 s", "HTTP 503"


class Probe(Protocol):
    def run(self, deadline: float) -> Observation:
        """Probe once; give up at `deadline` (time.monotonic()). Never raises."""
        ...
