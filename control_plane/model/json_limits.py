"""JSON from clients, parsed within limits that keep every later step possible.

A workflow travels to its runner inside one websocket message, which its serialiser can only
nest so deep; JSON nested deeper than :data:`MAX_DEPTH` is refused when it arrives (a 400
naming the limit) rather than accepted and left stuck. Python's own parser gives up far
deeper (a ``RecursionError``), which is answered the same way.
"""

from __future__ import annotations

import json
from typing import Any

from control_plane.model.errors import BadRequest

MAX_DEPTH = 64


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` levels deep (walked
    without recursion, stopping at the first branch too deep)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def check_depth(value: Any, what: str, limit: int = MAX_DEPTH) -> None:
    if depth_exceeds(value, limit):
        raise BadRequest(f"{what} is nested more than {limit} levels deep")


def parse_json(raw: str | bytes, what: str, limit: int = MAX_DEPTH) -> Any:
    """Parse ``raw`` or answer 400 saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"{what} is nested more than {limit} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from exc
    check_depth(data, what, limit)
    return data


def json_holds_nul(value: Any) -> bool:
    """Whether a NUL is in any key or string of ``value`` (PostgreSQL cannot store one in text)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
