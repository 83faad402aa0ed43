"""The installed package list matches the folders on disk, and imports flow one way."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = {
    "depdrill.discover": "discover",
    "depdrill.generate": "generate",
    "depdrill.execute": "execute",
    "depdrill.reports": "reports",
}
ORDER = ["depdrill.discover", "depdrill.generate", "depdrill.execute", "depdrill.reports"]


def _packages_on_disk() -> set[str]:
    found = set()
    roots = {"depdrill": ROOT / "depdrill", **{k: ROOT / v for k, v in STAGES.items()}}
    for package, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    return found


def test_pyproject_lists_every_package_folder() -> None:
    # Given pyproject's explicit package list and mapping
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # Then every folder with an __init__.py is listed, and nothing else
    assert set(config["packages"]) == _packages_on_disk()
    assert {k: v for k, v in config["package-dir"].items() if k != "depdrill"} == STAGES


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


# DESIGN §0's one exception: execute uses discover's capture (its taps: the packet socket
# to follow a dependency during a fault, ebpf and nflog for the doctor's checks).
CAPTURE = ("depdrill.discover.capture", "depdrill.discover.nflog", "depdrill.discover.ebpf")


def test_stages_import_only_earlier_stages_models() -> None:
    # Given every module of every stage
    offenders = []
    for index, stage in enumerate(ORDER):
        for path in (ROOT / STAGES[stage]).rglob("*.py"):
            for name in _imports(path):
                if name.startswith(("depdrill.cli", "depdrill.daemon", "depdrill.audit")):
                    offenders.append(f"{path}: imports the shell ({name})")
                for later in ORDER[index + 1 :]:
                    if name.startswith(later):
                        offenders.append(f"{path}: imports a later stage ({name})")
                for earlier in ORDER[:index]:
                    allowed = name.endswith(".model") or name in CAPTURE
                    if name.startswith(earlier + ".") and not allowed:
                        offenders.append(f"{path}: imports {name}, not a model")
    # Then none reaches forward, into the shell, or into an earlier stage's internals
    assert offenders == []


def test_the_lab_imports_no_stage_but_models() -> None:
    offenders = [
        f"{path}: {name}"
        for path in (ROOT / "depdrill" / "lab").rglob("*.py")
        for name in _imports(path)
        if name.startswith(tuple(STAGES)) and not name.endswith(".model")
    ]
    assert offenders == []
