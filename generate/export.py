"""The export formats of a suite, in one table: format name -> exporter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from depdrill.errors import InputError
from depdrill.generate.chaos_mesh import export_chaos_mesh
from depdrill.generate.chaos_toolkit import export_chaos_toolkit
from depdrill.generate.model import Suite
from depdrill.generate.pytest_export import export_pytest


@dataclass(frozen=True)
class ExportRequest:
    """What an exporter may need besides the suite."""

    suite_path: str = "suite.yaml"  # where the suite sits, as the export should name it
    selector: str | None = None  # Chaos Mesh: NAMESPACE/LABELKEY=VALUE


def _chaos_mesh(suite: Suite, request: ExportRequest) -> str:
    if request.selector is None:
        raise InputError("--format chaos-mesh needs a pod selector: --selector NAMESPACE/KEY=VALUE")
    return export_chaos_mesh(suite, request.selector)


EXPORTERS: dict[str, Callable[[Suite, ExportRequest], str]] = {
    "chaos-mesh": _chaos_mesh,
    "chaos-toolkit": lambda suite, request: export_chaos_toolkit(suite, request.suite_path),
    "pytest": lambda suite, request: export_pytest(suite, request.suite_path),
}


def export(suite: Suite, fmt: str, request: ExportRequest | None = None) -> str:
    """The suite in format `fmt` (one of EXPORTERS)."""
    exporter = EXPORTERS.get(fmt)
    if exporter is None:
        raise InputError(f"unknown export format {fmt!r}; one of: {', '.join(EXPORTERS)}")
    return exporter(suite, request or ExportRequest())
