"""Dependencies point one way: protocol imports nothing of ours; control_plane and
runner_agent import protocol and never each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"protocol", "control_plane", "runner_agent", "comfyui_sim", "comfyfleet"}
ALLOWED = {
    "protocol": {"protocol"},
    "control_plane": {"control_plane", "protocol"},
    "runner_agent": {"runner_agent", "protocol"},
    "comfyui_sim": {"comfyui_sim"},
}


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    wrong = {
        str(f.relative_to(ROOT)): sorted(imported_packages(f) - ALLOWED[package])
        for f in files
        if imported_packages(f) - ALLOWED[package]
    }
    assert wrong == {}
