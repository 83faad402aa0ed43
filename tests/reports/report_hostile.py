"""A run whose every attacker-chosen text is hostile, and a parser of what a page holds."""

from __future__ import annotations

from html.parser import HTMLParser

from depdrill.discover.model import Graph
from depdrill.execute.model import Results, Sample
from depdrill.reports.synthetic import Behaviour, synthetic_run

# Text an attacker controls: DNS names, certificate fields, error messages.
HOSTILE_NAMES = [
    "<script>alert(1)</script>.evil.test",
    '"><img src=x onerror=alert(1)>.evil.test',
    "javascript:alert(1)//.evil.test",
    "xn--80ak6aa92e.evil.test",  # IDN: аррӏе, a homograph of apple
    "\u202egnp.exe.evil.test",  # right-to-left override: reads as tset.live.exe.png
    ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]),  # 253 characters: 255 bytes on the wire
]
HOSTILE_ERROR = "<script>fetch('//x')</script>\u202e<img src=x onerror=alert(2)>"


HOSTILE_SERVICE = "<script>alert('svc')</script>"


def hostile_run(
    names: list[str] | None = None, error: str = HOSTILE_ERROR, service: str = HOSTILE_SERVICE
) -> tuple[Results, Graph]:
    """A run whose names, certificate subjects, errors, rules and service name are hostile."""
    behaviours = [
        Behaviour(name, f"198.18.0.{10 + i}", 443, blackhole="hang", tls_days_left=5)
        for i, name in enumerate(HOSTILE_NAMES if names is None else names)
    ]
    results, graph = synthetic_run(behaviours, service=service)
    tests = []
    for test in results.tests:
        samples = [
            s if s.ok else Sample(t=s.t, phase=s.phase, ok=False, error=error) for s in test.samples
        ]
        fault = test.fault
        if fault is not None:
            fault = fault.model_copy(update={"rules": [*fault.rules, error]})
        tests.append(test.model_copy(update={"samples": samples, "fault": fault, "rule": error}))
    return results.model_copy(update={"tests": tests}), graph


# Every element the template itself writes; anything else came from data.
TEMPLATE_TAGS = {
    "html", "head", "meta", "title", "style", "body", "main", "header", "nav", "section",
    "article", "footer", "div", "p", "span", "b", "a", "br", "pre", "h1", "h2", "h3", "h4", "h5",
    "dl", "dt", "dd", "ol", "ul", "li", "table", "thead", "tbody", "tr", "th", "td",
    "svg", "g", "path", "rect", "line", "text",
}  # fmt: skip


class Elements(HTMLParser):
    """Every start tag with its attributes, and all text, as a browser's tokenizer sees it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_page(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    parser.close()
    return parser
