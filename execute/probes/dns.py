"""DNS probe: healthy when the server answers the query with NOERROR and a record."""

from __future__ import annotations

import time
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from depdrill.execute.probes.base import Observation, describe_os_error
from depdrill.generate.model import DnsProbe as DnsProbeSpec


@dataclass(frozen=True)
class DnsProbe:
    spec: DnsProbeSpec

    def run(self, deadline: float) -> Observation:
        start = time.monotonic()
        left = deadline - start
        if left <= 0:
            return Observation(False, None, "timeout after 0.0 s")
        query = dns.message.make_query(self.spec.name, dns.rdatatype.from_text(self.spec.qtype))
        try:
            answer = dns.query.udp(query, self.spec.server, timeout=left)
        except dns.exception.Timeout:
            return Observation(False, None, f"timeout after {left:.1f} s")
        except OSError as exc:
            return Observation(False, None, describe_os_error(exc))
        except dns.exception.DNSException as exc:
            return Observation(False, None, f"bad DNS answer ({exc.__class__.__name__})")
        latency_ms = (time.monotonic() - start) * 1000
        rcode = answer.rcode()
        if rcode != dns.rcode.NOERROR:
            return Observation(False, latency_ms, f"DNS {dns.rcode.to_text(rcode)}")
        if not answer.answer:
            return Observation(False, latency_ms, "DNS NOERROR without an answer")
        return Observation(True, latency_ms)
