"""Attacker-chosen names, certificate fields and errors reach the page only as text."""

from __future__ import annotations

import re

from report_hostile import HOSTILE_NAMES, TEMPLATE_TAGS, parse_page

from depdrill.discover.model import Graph
from depdrill.execute.model import Results
from depdrill.reports.render import render_html


def test_hostile_text_makes_no_element_or_attribute(hostile: tuple[Results, Graph]) -> None:
    # Given a run whose names, certificate subjects, errors, rules and service name carry
    # <script>, an <img onerror>, javascript: URLs, IDN, right-to-left overrides, 253-char names
    results, graph = hostile
    # When the page is rendered
    page = parse_page(render_html(results, graph))
    # Then only the template's own elements exist: no script, img or event handler
    assert {tag for tag, _ in page.tags} <= TEMPLATE_TAGS
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            assert "javascript:" not in (value or "").lower(), (tag, name, value)
            if name == "href":
                # links only to the page's own sections, ids made of [a-z0-9-]
                assert re.fullmatch(r"#[a-z0-9-]+", value or ""), value
            if name == "style":
                assert re.fullmatch(r"width: \d{1,3}%", value or ""), value
            assert name not in {"src", "srcset", "xlink:href", "action", "formaction"}
    ids = [attrs["id"] for _, attrs in page.tags if "id" in attrs]
    assert all(re.fullmatch(r"[a-z0-9-]+", i or "") for i in ids)


def test_hostile_text_is_shown_to_the_reader(hostile: tuple[Results, Graph]) -> None:
    # Given the hostile run
    results, graph = hostile
    # When the page is rendered and read as text
    html = render_html(results, graph)
    text = "".join(parse_page(html).text)
    # Then the reader still sees each hostile name, escaped, not acted on
    for name in HOSTILE_NAMES:
        shown = name.replace("\u202e", "<U+202E>")
        assert shown in text, shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.evil.test" in html
    # the IDN is shown with its Unicode form, to expose the homograph
    assert "(IDN: аррӏе.evil.test)" in text
    # and no raw bidi control can reorder what is drawn around it
    assert "\u202e" not in html


def test_the_page_forbids_scripts_and_loads_nothing(hostile: tuple[Results, Graph]) -> None:
    # Given the hostile run rendered
    results, graph = hostile
    page = parse_page(render_html(results, graph))
    # Then a Content-Security-Policy meta tag forbids scripts and every fetch but data: images
    csp = next(
        a["content"]
        for t, a in page.tags
        if t == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy"
    )
    assert csp is not None
    assert "default-src 'none'" in csp
    assert "script-src" not in csp  # falls back to default-src 'none'
    # and the CSS asks for nothing from outside (no @import, no url())
    style = "".join(page.text)
    assert "@import" not in style and "url(" not in style
