"""Command probe: healthy when the command exits 0 in time (only with --allow-commands)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from depdrill.execute.probes.base import Observation, describe_os_error
from depdrill.generate.model import CommandProbe as CommandProbeSpec


@dataclass(frozen=True)
class CommandProbe:
    spec: CommandProbeSpec

    def run(self, deadline: float) -> Observation:
        start = time.monotonic()
        left = deadline - start
        if left <= 0:
            return Observation(False, None, "timeout after 0.0 s")
        try:
            done = subprocess.run(
                self.spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=left,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return Observation(False, None, f"timeout after {left:.1f} s")
        except OSError as exc:
            return Observation(False, None, describe_os_error(exc))
        latency_ms = (time.monotonic() - start) * 1000
        if done.returncode != 0:
            return Observation(False, latency_ms, f"exit status {done.returncode}")
        return Observation(True, latency_ms)
