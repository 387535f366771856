"""Where downloaded outputs go: names a runner chose, made safe to write under a folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def safe_name(filename: str, fallback: str) -> str:
    """The last part of a runner's file name, never a path out of the folder."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip().replace("\x00", "")
    return fallback if name in ("", ".", "..") else name


def target_path(directory: Path, output: Mapping[str, Any], taken: set[Path]) -> Path:
    """A path for ``output`` under ``directory`` that no other output of the same download
    has: two nodes may well save files of one name."""
    output_id = str(output.get("id", "output"))
    path = directory / safe_name(str(output.get("filename") or ""), output_id)
    if path in taken:
        path = path.with_name(f"{path.stem}-{output_id[:8]}{path.suffix}")
    taken.add(path)
    return path


def part_path(path: Path) -> Path:
    """Where a download is written until it is whole, so that a broken one leaves no file
    that looks complete."""
    return path.with_name(path.name + ".part")
