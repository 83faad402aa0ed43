"""Export a suite as a pytest module: one test per suite test, each run through depdrill."""

from __future__ import annotations

import re
from pathlib import Path

import jinja2

from depdrill.generate.model import Suite
from depdrill.generate.suitefile import comment_lines

_SLACK_S = 60


def export_pytest(suite: Suite, suite_path: Path | str) -> str:
    """The module's source. `suite_path` is where the suite will sit relative to the module."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("depdrill.generate", "templates"),
        # Python source, not HTML: every value from the suite goes in as a string literal or
        # a comment made printable, so no name can end a string or a line.
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    template = environment.get_template("pytest_module.py.j2")
    timing = suite.defaults.timing
    used: set[str] = set()
    tests = []
    for test in suite.tests:
        skip_reason = None
        if test.removed:
            skip_reason = _py_str("the dependency is gone (marked removed in the suite)")
        elif test.skip:
            skip_reason = _py_str(test.note or "skipped in the suite")
        tests.append(
            {
                "function": _function_name(test.id, used),
                "id_literal": _py_str(test.id),
                "comment": comment_lines(test),
                "skip_reason": skip_reason,
            }
        )
    return template.render(
        service_literal=_py_str(suite.service.name),
        suite_literal=_py_str(str(suite_path)),
        timeout_s=int(timing.baseline_s + timing.observe_s + timing.recovery_s) + _SLACK_S,
        tests=tests,
    )


def _function_name(test_id: str, used: set[str]) -> str:
    base = "test_" + re.sub(r"[^a-z0-9]+", "_", test_id.lower()).strip("_")
    name, n = base, 2
    while name in used:
        name, n = f"{base}_{n}", n + 1
    used.add(name)
    return name


def _py_str(text: str) -> str:
    """A Python string literal for any text, double-quoted where it can be (as ruff formats)."""
    literal = repr(text)
    return literal if literal.startswith('"') or '"' in text else f'"{literal[1:-1]}"'
