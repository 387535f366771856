"""Dependencies point one way: protocol imports nothing of ours; control_plane and
runner_agent import protocol and never each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from control_plane.model.lifecycle import TaskStatus, WorkflowStatus

ROOT = Path(__file__).resolve().parents[1]
OURS = {"protocol", "control_plane", "runner_agent", "comfyui_sim", "comfyfleet"}
ALLOWED = {
    "protocol": {"protocol"},
    "control_plane": {"control_plane", "protocol"},
    "runner_agent": {"runner_agent", "protocol"},
    "comfyui_sim": {"comfyui_sim"},
}


def top_level_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def imported_packages(path: Path) -> set[str]:
    return top_level_imports(path) & OURS


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


# Inside the control plane, dependencies point down: the HTTP and agent fronts use the fleet,
# the fleet uses the database, and everything may use the model (and the settings and fail
# points, which are plain values; and the check of where it may connect). The webhook sender
# sits beside the fronts: it reads the fleet's events and the database. ``services`` and
# ``auth`` are what both fronts share; ``app`` puts it all together.
LAYERS = {
    "model": {"model", "settings", "failpoints"},
    "db": {"db", "model", "settings", "failpoints"},
    "fleet": {"fleet", "db", "model", "settings", "failpoints", "public_addresses"},
    "webhooks": {"webhooks", "fleet", "db", "model", "settings", "failpoints", "public_addresses"},
    "agents": {"agents", "fleet", "db", "model", "settings", "failpoints", "services", "auth"},
    "web": {
        "web",
        "webhooks",
        "fleet",
        "db",
        "model",
        "settings",
        "failpoints",
        "services",
        "auth",
        "public_addresses",
    },
}


def control_plane_parts(path: Path) -> set[str]:
    """The parts of control_plane a module imports: "db" for control_plane.db.store, and so on."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = node.module.split(".")
            if names[0] == "control_plane":
                found.add(names[1] if len(names) > 1 else node.names[0].name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "control_plane" and len(names) > 1:
                    found.add(names[1])
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_control_plane_layers_depend_only_downwards(layer: str) -> None:
    files = sorted((ROOT / "control_plane" / layer).rglob("*.py"))
    assert files, f"control_plane/{layer} has no modules"
    wrong = {
        str(f.relative_to(ROOT)): sorted(control_plane_parts(f) - LAYERS[layer])
        for f in files
        if control_plane_parts(f) - LAYERS[layer]
    }
    assert wrong == {}


def test_the_low_modules_import_no_layer() -> None:
    for name in ("settings", "failpoints", "public_addresses"):
        assert control_plane_parts(ROOT / "control_plane" / f"{name}.py") <= {"failpoints"}, name


def test_sql_is_written_only_under_db() -> None:
    outside = [
        str(f.relative_to(ROOT))
        for f in sorted((ROOT / "control_plane").rglob("*.py"))
        if "db" not in f.relative_to(ROOT / "control_plane").parts
        and {"sqlalchemy", "sqlmodel"} & top_level_imports(f)
    ]
    assert outside == []


STATUS_WORDS = {s.value for s in WorkflowStatus} | {s.value for s in TaskStatus}


def test_status_strings_are_written_only_in_the_lifecycle_module() -> None:
    """Elsewhere a state is named through WorkflowStatus or TaskStatus, so that a new state,
    or a renamed one, has one place to change."""
    found = []
    for path in sorted((ROOT / "control_plane").rglob("*.py")):
        if path.name == "lifecycle.py" or "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in STATUS_WORDS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == []
