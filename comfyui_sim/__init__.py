"""A ComfyUI stand-in: ComfyUI's HTTP and websocket protocol over real, model-free nodes."""

from .app import create_app, start_simulator
from .settings import SimSettings

__all__ = ["SimSettings", "create_app", "start_simulator"]
