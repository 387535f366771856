"""The comfyfleet runner agent: a daemon on a GPU host that takes jobs from the control plane
and runs them on the local ComfyUI."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("comfyfleet")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
