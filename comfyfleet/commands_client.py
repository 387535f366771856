"""The client commands, registered on ``comfyfleet``'s parser: ``run``, ``rerun``, ``sweep``,
``sweeps``, ``workflows``, ``runners`` and ``login``. Each sets ``client_command``, which
``main`` calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

from comfyfleet import commands_login, commands_run, commands_runners, commands_sweeps, commands_workflows
from comfyfleet.commands_common import common_flags

if TYPE_CHECKING:
    from comfyfleet.commands_common import Sub


def add_client_commands(sub: Sub) -> None:
    common = common_flags()
    for module in (commands_run, commands_sweeps, commands_workflows, commands_runners, commands_login):
        module.add(sub, common)
