"""TCP probe: healthy when a connection to host:port completes in time."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from depdrill.execute.probes.base import Observation, describe_os_error
from depdrill.generate.model import TcpProbe as TcpProbeSpec


@dataclass(frozen=True)
class TcpProbe:
    spec: TcpProbeSpec

    def run(self, deadline: float) -> Observation:
        start = time.monotonic()
        left = deadline - start
        if left <= 0:
            return Observation(False, None, "timeout after 0.0 s")
        try:
            with socket.create_connection((self.spec.host, self.spec.port), timeout=left):
                pass
        except TimeoutError:
            return Observation(False, None, f"timeout after {left:.1f} s")
        except OSError as exc:
            return Observation(False, None, describe_os_error(exc))
        return Observation(True, (time.monotonic() - start) * 1000)
