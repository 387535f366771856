"""What one simulator instance is told at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SimSettings:
    """Settings of one simulated ComfyUI.

    The object stays live while the simulator runs: ``node_delays_s`` and ``fail_nodes`` are
    read each time a node starts, so a test holding the object (or ``POST /sim/config``)
    can steer a running server.
    """

    # input/, output/ and temp/ are created under it at start.
    data_dir: Path
    # Seconds a node takes, keyed by class_type or node id (the id wins when both match).
    node_delays_s: dict[str, float] = field(default_factory=dict)
    # class_type or node id -> message of the exception the node raises (execution_error).
    fail_nodes: dict[str, str] = field(default_factory=dict)
    # How long POST /prompt takes to answer (a busy server), so that tests can catch a job
    # between its inputs being uploaded and its prompt being queued.
    prompt_accept_delay_s: float = 0.0
    # Node classes this simulated install leaves out of /object_info, so that runners can
    # differ in what they offer.
    hidden_nodes: set[str] = field(default_factory=set)
    # Reported as comfyui_version by /system_stats.
    version: str = "0.3.64"

    def __post_init__(self) -> None:
        # Callers pass str as often as Path; everything below joins paths.
        self.data_dir = Path(self.data_dir)
