"""JUnit XML for CI systems: a testsuite per service, a testcase per test."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from depdrill.execute.model import Results, TestResult, Verdict

_FAILING = {Verdict.FAILED, Verdict.NO_RECOVERY}


def _seconds(result: TestResult) -> str:
    return f"{max(0.0, (result.ended - result.started).total_seconds()):.3f}"


def _clean(text: str) -> str:
    # XML 1.0 cannot carry most control characters, even escaped; names are attacker text.
    return "".join(
        ch if ch in "\t\n\r" or (ord(ch) >= 0x20 and ord(ch) not in (0xFFFE, 0xFFFF)) else "?"
        for ch in text
    )


def to_junit(results: Results) -> str:
    """The results as a JUnit XML document (ElementTree escapes every attribute and text)."""
    suite = results.suite.service.name
    root = ET.Element("testsuites", name="depdrill")
    testsuite = ET.SubElement(
        root,
        "testsuite",
        name=_clean(suite),
        tests=str(len(results.tests)),
        failures=str(sum(results.count(v) for v in _FAILING)),
        errors=str(results.count(Verdict.ERROR)),
        skipped=str(results.count(Verdict.SKIPPED)),
        timestamp=results.started.isoformat(),
        time=f"{(results.ended - results.started).total_seconds():.3f}",
        hostname=_clean(results.host.hostname),
    )
    for result in results.tests:
        case = ET.SubElement(
            testsuite,
            "testcase",
            name=_clean(result.id),
            classname=_clean(result.kind),
            time=_seconds(result),
        )
        props = ET.SubElement(case, "properties")
        ET.SubElement(props, "property", name="verdict", value=result.verdict.value)
        if result.dependency is not None:
            ET.SubElement(props, "property", name="dependency", value=_clean(result.dependency))
        message = _clean(result.rule)
        if result.verdict in _FAILING:
            failure = ET.SubElement(case, "failure", message=message, type=result.verdict.value)
            failure.text = message
        elif result.verdict == Verdict.ERROR:
            reason = result.reason.value if result.reason else "error"
            error = ET.SubElement(case, "error", message=message, type=reason)
            error.text = message
        elif result.verdict == Verdict.SKIPPED:
            ET.SubElement(case, "skipped", message=message)
        # A passing case still says how it passed: tolerant and degraded differ.
        ET.SubElement(case, "system-out").text = f"{result.verdict.value}: {message}"
    if results.halted:
        ET.SubElement(testsuite, "system-out").text = _clean(f"suite halted: {results.halted}")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
