"""Small wordings shared by the findings, the view and the page: durations, names, anchors."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from urllib.parse import urlsplit

from depdrill.generate.model import CommandProbe, DnsProbe, HttpProbe, Probe, Suite, SuiteTest

_SLUG = re.compile(r"[^a-z0-9]+")


def anchor(prefix: str, key: str) -> str:
    """An element id made only of [a-z0-9-], unique per key: never data in an attribute."""
    slug = _SLUG.sub("-", key.lower()).strip("-")[:40]
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{prefix}-{slug}-{digest}" if slug else f"{prefix}-{digest}"


def duration(ms: float | None) -> str:
    """830 ms, 3.1 s: the precision a reader needs."""
    if ms is None:
        return "n/a"
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.1f} s"


def percent(ratio: float) -> str:
    return f"{ratio * 100:.0f}%"


def visible(text: str, limit: int | None = None, allowed: str = "") -> str:
    """Text with control and bidi-override characters shown as <U+202E>, so a name cannot
    reorder or hide what is drawn around it; cut in the middle past `limit` characters.
    Characters in `allowed` pass as they are."""
    out = []
    for char in text:
        if char in allowed:
            out.append(char)
        elif unicodedata.category(char) in {"Cc", "Cf", "Co", "Cs", "Zl", "Zp"}:
            out.append(f"<U+{ord(char):04X}>")
        else:
            out.append(char)
    shown = "".join(out)
    if limit is not None and len(shown) > limit:
        keep = max(limit - 1, 2)
        shown = shown[: keep - keep // 2] + "…" + shown[len(shown) - keep // 2 :]
    return shown


def visible_lines(text: str) -> str:
    """As `visible`, for text shown in a <pre>: its line breaks and tabs are layout."""
    return visible(text, allowed="\n\t")


def unicode_form(name: str) -> str | None:
    """The Unicode form of an IDN (xn-- labels), to show next to what was on the wire."""
    if "xn--" not in name.lower():
        return None
    labels = []
    for label in name.split("."):
        if label.lower().startswith("xn--"):
            try:
                labels.append(label[4:].encode("ascii").decode("punycode"))
            except (UnicodeError, ValueError):
                return None
        else:
            labels.append(label)
    return ".".join(labels)


def describe_probe(probe: Probe) -> str:
    if isinstance(probe, HttpProbe):
        return f"GET {probe.url} expecting {probe.expect_status} within {probe.timeout_s:g} s"
    if isinstance(probe, DnsProbe):
        return f"DNS {probe.qtype} {probe.name} via {probe.server}"
    if isinstance(probe, CommandProbe):
        return f"command {' '.join(probe.argv)}"
    return f"TCP connect {probe.host}:{probe.port}"


def health_check(suite: Suite) -> str:
    """What a reader calls the health check: the HTTP path (/health), or the probe in short."""
    probe = suite.service.probes[0]
    if isinstance(probe, HttpProbe):
        return urlsplit(probe.url).path or "/"
    if isinstance(probe, DnsProbe):
        return f"the DNS check of {probe.name}"
    if isinstance(probe, CommandProbe):
        return "the health command"
    return f"the TCP check of {probe.host}:{probe.port}"


def probe_timeout_ms(suite: Suite) -> float:
    return suite.service.probes[0].timeout_s * 1000


def label_of(test: SuiteTest | None, kind: str) -> str:
    """blackhole, +1000 ms, dns blackhole, cert."""
    fault = test.fault if test is not None else None
    if fault is not None and fault.kind == "latency":
        return f"+{fault.delay_ms} ms"
    return {"dns-blackhole": "dns blackhole"}.get(kind, kind)
