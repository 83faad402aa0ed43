"""Test helpers shipped with the package: the findings as golden text (with what differs
between two audits of the same lab replaced by placeholders) and screenshots of a report in
headless Chromium. Used by tests/reports and by the lab's integration test."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from depdrill.reports.model import ReportFinding

ARTIFACTS_DEFAULT = Path("/tmp/depdrill-artifacts")
SCREENSHOT_HEIGHT = 2400

# What a second audit of the same lab changes, and so what a golden must not pin: the lab's
# /24 (any 198.18.N), the digests that anchors carry (they hash addresses), dates, probe
# counts (the observe window holds fewer samples when probes hang) and measured durations.
# Whether no probe succeeded is kept: that is what a finding says.
# Configured numbers (the budget, the injected delay, the probe's timeout) stay as written.
_LAB_ADDRESS = re.compile(r"\b198([.-])18\1\d{1,3}\1")
_ANCHOR_DIGEST = re.compile(r"(#[a-z0-9-]+)-[0-9a-f]{8}\b")
_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
_DURATION = r"\d+(?:\.\d+)? m?s"
_MEASURED = [
    (re.compile(rf"\bp95 {_DURATION}"), "p95 <measured>"),
    (re.compile(rf"\({_DURATION} before the fault\)"), "(<measured> before the fault)"),
    (re.compile(rf"\btake {_DURATION} \(p95\)"), "take <measured> (p95)"),
    (re.compile(rf"\btook {_DURATION}"), "took <measured>"),
]
_PROBES = re.compile(r"\b(\d+) of (\d+) probes\b")
_TIMES = re.compile(r"\b\d+×")
_DAYS_FRACTION = re.compile(r"\b(\d+)\.\d+ days\b")


def findings_text(findings: Sequence[ReportFinding]) -> str:
    """The findings as a reviewer reads them: severity, code, title, evidence, fix."""
    lines = []
    for f in findings:
        lines.append(f"[{f.severity}] {f.code} #{f.anchor}")
        lines.append(f"  {f.title}")
        lines.extend(f"  - {e}" for e in f.evidence)
        lines.append(f"  fix: {f.fix}")
    return "\n".join(lines) + "\n"


def _probes(match: re.Match[str]) -> str:
    # None succeeding is the finding itself; any other count moves with a probe's luck.
    return "0 of <n> probes" if match.group(1) == "0" else "<k> of <n> probes"


def normalised(text: str) -> str:
    """The text with every run-specific part replaced by a placeholder (see above)."""
    text = _ANCHOR_DIGEST.sub(r"\1-<digest>", text)
    text = _LAB_ADDRESS.sub(lambda m: f"198{m[1]}18{m[1]}<lab>{m[1]}", text)
    text = _DATE.sub("<date>", text)
    for pattern, placeholder in _MEASURED:
        text = pattern.sub(placeholder, text)
    text = _PROBES.sub(_probes, text)
    text = _TIMES.sub("<n>×", text)
    # "expires in 10.0 days": the fraction moves with the minute the lab was built
    return _DAYS_FRACTION.sub(r"\1 days", text)


def compare_golden(path: Path, text: str) -> None:
    """Raise AssertionError with a diff when `text` differs from the golden file;
    DEPDRILL_UPDATE_GOLDEN=1 rewrites the file first (then review the diff in git)."""
    if os.environ.get("DEPDRILL_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    expected = path.read_text(encoding="utf-8")
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True), text.splitlines(keepends=True), str(path), "now"
        )
    )
    if diff:
        raise AssertionError(
            f"findings drifted from {path} (DEPDRILL_UPDATE_GOLDEN=1 rewrites it):\n{diff}"
        )


def artifacts_dir() -> Path:
    """Where a test run keeps its artifacts ($DEPDRILL_ARTIFACTS), created if missing."""
    folder = Path(os.environ.get("DEPDRILL_ARTIFACTS", str(ARTIFACTS_DEFAULT)))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def chromium(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Debian's chromium, headless, with a throwaway profile and nothing that phones home."""
    binary = shutil.which("chromium")
    if binary is None:
        raise FileNotFoundError("Debian's chromium is not installed (apt-get install chromium)")
    argv = [
        binary, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--no-first-run", "--disable-component-update",
        "--disable-sync", "--disable-default-apps", "--hide-scrollbars", "--mute-audio",
        f"--user-data-dir={workdir / 'chromium-profile'}", *args,
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(workdir)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, env=env, check=False)


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError(f"{path} is not a PNG")
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def screenshot(page: Path, shot: Path, width: int, workdir: Path) -> Path:
    """A screenshot of the page at this width; AssertionError when it is missing, of the
    wrong size or blank (a blank page is ~9 kB; the lab's report is hundreds)."""
    shot.unlink(missing_ok=True)
    done = chromium(
        workdir, f"--window-size={width},{SCREENSHOT_HEIGHT}", f"--screenshot={shot}",
        page.resolve().as_uri(),
    )  # fmt: skip
    if not shot.exists():
        raise AssertionError(f"chromium wrote no screenshot: {done.stderr[-1500:]}")
    size = png_size(shot)
    if size != (width, SCREENSHOT_HEIGHT):
        raise AssertionError(f"{shot} is {size}, expected {(width, SCREENSHOT_HEIGHT)}")
    if shot.stat().st_size <= 60_000:
        raise AssertionError(f"{shot} looks blank ({shot.stat().st_size} bytes)")
    return shot


def screenshots(page: Path, name: str, workdir: Path) -> list[Path]:
    """Desktop (1280 px) and narrow (390 px) screenshots into the artifacts folder."""
    folder = artifacts_dir()
    return [
        screenshot(page, folder / f"{name}-{label}.png", width, workdir)
        for label, width in (("desktop", 1280), ("narrow", 390))
    ]
