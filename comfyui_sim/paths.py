"""The input/, output/ and temp/ folders and ComfyUI's rules for naming files in them.

Everything here touches the disk and is synchronous: callers on the event loop go through
``asyncio.to_thread``.
"""

from __future__ import annotations

import mimetypes
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

FOLDER_TYPES = ("input", "output", "temp")

# "name.png [output]" picks the folder in the name itself (LoadImage and /view accept it).
_ANNOTATIONS = {f" [{kind}]": kind for kind in FOLDER_TYPES}


def is_within(base: str, candidate: str) -> bool:
    """True when ``candidate`` (absolute) is ``base`` or below it."""
    try:
        return os.path.commonpath((base, candidate)) == base
    except ValueError:  # different drives, or a mix of absolute and relative
        return False


def split_annotation(name: str) -> tuple[str, str | None]:
    """("a.png [output]") -> ("a.png", "output"); names without a tag keep None."""
    for suffix, kind in _ANNOTATIONS.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


@dataclass(frozen=True)
class SimPaths:
    root: Path

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def temp(self) -> Path:
        return self.root / "temp"

    def prepare(self) -> None:
        """Create the folders; empty temp/ as ComfyUI does when it starts."""
        for folder in (self.input, self.output):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.temp, ignore_errors=True)
        self.temp.mkdir(parents=True, exist_ok=True)

    def directory_for_type(self, kind: str | None) -> Path | None:
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind or "")

    def annotated_path(self, name: str, default_kind: str = "input") -> Path | None:
        """The file a LoadImage-style value names, or None if it would leave its folder."""
        bare, kind = split_annotation(name)
        base = self.directory_for_type(kind or default_kind)
        if base is None or not bare:
            return None
        base_abs = os.path.abspath(base)
        candidate = os.path.abspath(os.path.join(base_abs, bare))
        if not is_within(base_abs, candidate) or candidate == base_abs:
            return None
        return Path(candidate)

    def input_exists(self, name: str) -> bool:
        path = self.annotated_path(name)
        return path is not None and path.is_file()

    def model_files(self, folder: str) -> list[str]:
        """Files under models/<folder>/, as ComfyUI lists them for a loader, sorted."""
        base = self.root / "models" / folder
        return sorted(p.name for p in base.iterdir() if p.is_file()) if base.is_dir() else []

    def input_images(self) -> list[str]:
        """Image files under input/, subfolders included, as ``sub/name.png``, sorted."""
        found: list[str] = []
        base = self.input
        if not base.is_dir():
            return found
        for dirpath, _dirs, files in os.walk(base):
            rel_dir = os.path.relpath(dirpath, base)
            for name in files:
                mime, _ = mimetypes.guess_type(name)
                if mime is None or not mime.startswith("image/"):
                    continue
                rel = name if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{name}"
                found.append(rel)
        return sorted(found)
