"""How ``run`` and ``rerun`` show a workflow going: a live progress bar on a terminal, one
plain line per change when the output goes to a file or a pipe, nothing with ``--json``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol, TextIO

from comfyfleet.client import Event, Progress

if TYPE_CHECKING:
    import rich.progress


class Display(Protocol):
    def update(self, event: Event) -> None: ...

    def close(self) -> None: ...


class Silent:
    """For ``--json``: stdout carries one JSON document and nothing else."""

    def update(self, event: Event) -> None:
        pass

    def close(self) -> None:
        pass


class Lines:
    """A line each time what is shown changes (status, queue position, node, percent)."""

    def __init__(self, workflow_id: str, out: TextIO) -> None:
        self.progress = Progress(workflow_id)
        self._out = out
        self._last = ""

    def update(self, event: Event) -> None:
        self.progress = self.progress.after(event)
        line = self.progress.line()
        if line != self._last:
            self._last = line
            print(f"{self.progress.workflow_id}  {line}", file=self._out, flush=True)

    def close(self) -> None:
        pass


class Bar:
    """rich's live bar: the status, then the queue position or the node, the percent."""

    def __init__(self, workflow_id: str, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.progress = Progress(workflow_id)
        self._bar: rich.progress.Progress = RichProgress(
            TextColumn("[bold]{task.description}"),
            TextColumn("{task.fields[status]:<9}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(file=out),
        )
        self._task = self._bar.add_task(workflow_id[:8], total=100, status="accepted", detail="")
        self._bar.start()

    def update(self, event: Event) -> None:
        self.progress = now = self.progress.after(event)
        detail = ""
        if now.queue_number is not None and now.status in ("accepted", "uploaded", "queued"):
            detail = f"queue position {now.queue_number}"
        elif now.node is not None and now.status == "running":
            detail = f"node {now.node}"
        self._bar.update(self._task, completed=now.percent or 0, status=now.status, detail=detail)

    def close(self) -> None:
        self._bar.stop()


def display_for(workflow_id: str, *, as_json: bool, out: TextIO | None = None) -> Display:
    out = out or sys.stdout
    if as_json:
        return Silent()
    return Bar(workflow_id, out) if out.isatty() else Lines(workflow_id, out)
