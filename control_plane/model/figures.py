"""The fleet's figures a metrics scrape reads from the database."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class FleetFigures:
    """What a scrape reads from the database, for the accounts it may show."""

    account_names: dict[str, str]  # account id -> name
    workflows: list[tuple[str, str, int]] = field(default_factory=list)  # account, status, count
    waiting: list[tuple[str, int, datetime | None]] = field(default_factory=list)  # account, count, oldest
