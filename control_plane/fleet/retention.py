"""Retention: a finished workflow's files go once its account's tier keeps them no longer.

Every ``retention_sweep_s`` the sweep takes the finished workflows past their tier's
``retention_days``, oldest first, and for each, in one transaction that locks its row: its
outputs and its references to its inputs are removed and the workflow marked
``files_removed_at`` (its record, status and history stay). The blobs that nothing refers to
any more (no other workflow's input or output, no upload of an account) are then removed
from the blob store, after the commit and unless a request in flight holds them.

A rerun of the workflow locks the same row (``FOR SHARE``) when it inserts: one that went
first refers to the files itself, and they stay; one that comes after is refused, its files
being gone. Every control plane on a database sweeps; the lock makes each workflow one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from control_plane.db.blobs import BlobStore
from control_plane.db.store import Store
from control_plane.db.tables import utcnow
from control_plane.settings import Settings

log = logging.getLogger(__name__)

BATCH = 100


@dataclass(frozen=True)
class SweepResult:
    workflows: int  # whose files were removed
    blobs: int  # removed from the blob store


class Retention:
    def __init__(self, settings: Settings, store: Store, blobs: BlobStore) -> None:
        self.settings, self.store, self.blobs = settings, store, blobs
        self.periods = {
            name: timedelta(days=tier.retention_days)
            for name, tier in settings.tiers.items()
            if tier.retention_days > 0
        }
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.periods:
            self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                result = await self.sweep()
                if result.workflows:
                    log.info(
                        "retention: removed the files of %d workflows (%d blobs)",
                        result.workflows,
                        result.blobs,
                    )
            except Exception:  # the next round tries again
                log.exception("retention sweep failed")
            await asyncio.sleep(self.settings.retention_sweep_s)  # the sweep's pace

    async def sweep(self) -> SweepResult:
        """One round: every workflow due now, in batches."""
        now, workflows, removed = utcnow(), 0, 0
        while True:
            due = await self.store.due_for_file_removal(self.periods, now, BATCH)
            before = workflows
            for workflow_id in due:
                unused = await self.store.remove_files(workflow_id, self.periods, now)
                if unused is None:
                    continue  # it moved on meanwhile (a rerun of it), or another sweep took it
                workflows += 1
                for sha256 in unused:
                    # A request in flight may be about to refer to the same bytes.
                    if not self.blobs.held(sha256):
                        await self.blobs.delete(sha256)
                        removed += 1
            if len(due) < BATCH or workflows == before:
                return SweepResult(workflows, removed)
