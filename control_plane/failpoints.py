"""Fail points: named places where the control plane can be made to die as a crash would
(``os._exit``: nothing cleaned up, nothing answered), so that a test or the chaos run can stop
it at exactly the worst moment. ``failpoints`` (``COMFYFLEET_FAILPOINTS``) names the active
ones, comma-separated; empty, as in production, they do nothing.

    before_workflow_commit   a new workflow and its Idempotency-Key answer are written, not committed
    after_workflow_commit    they are committed; the client has not been answered
    after_attempt_commit     a rerun's new attempt (and its answer) is committed, not answered
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

KNOWN = frozenset({"before_workflow_commit", "after_workflow_commit", "after_attempt_commit"})
# What the process exits with at a fail point: EX_TEMPFAIL, told apart from a real failure.
EXIT_CODE = 75


def parse(names: str) -> frozenset[str]:
    active = frozenset(name.strip() for name in names.split(",") if name.strip())
    unknown = sorted(active - KNOWN)
    if unknown:
        raise ValueError(f"unknown fail points {', '.join(unknown)} (known: {', '.join(sorted(KNOWN))})")
    return active


class FailPoints:
    def __init__(self, active: frozenset[str] = frozenset()) -> None:
        self.active = active

    def hit(self, name: str) -> None:
        if name in self.active:
            log.critical("fail point %s: the control plane exits as a crash would", name)
            logging.shutdown()
            os._exit(EXIT_CODE)
