"""A sweep's parameter sets: every combination of a grid, or a list of sets as given.

    {"grid": {"$prompt": ["a fox", "a cat"], "#sampler": ["euler", "dpm_2"]}}  → 4 sets
    {"sets": [{"$prompt": "a fox"}, {"$prompt": "a cat", "$steps": 30}]}       → 2 sets

A grid's sets come in the order of ``itertools.product``: the first name varies slowest. The
values stay raw JSON here; the web layer reads them as a JSON submission's would be read."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from control_plane.model.errors import BadRequest

# One sweep makes at most this many workflows (the tier's daily limit may allow fewer).
MAX_SETS = 1000
_NAME = re.compile(r"[$#][A-Za-z0-9_-]{1,255}")
_SHAPES = (
    'a sweep has "grid" ({"$name": [values…]}, every combination) or "sets" '
    '([{"$name": value, "#name": choice}, …]), one of them'
)


def parameter_sets(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The sets a sweep's body asks for, in order; 400 for any other shape."""
    if ("grid" in body) == ("sets" in body):
        raise BadRequest(_SHAPES)
    if "grid" in body:
        return _grid(body["grid"])
    return _listed(body["sets"])


def _grid(grid: Any) -> list[dict[str, Any]]:
    if not isinstance(grid, dict) or not grid:
        raise BadRequest("grid is an object of $name parameters and #name choices, each a list of values")
    for name, values in grid.items():
        _check_name(name, "grid")
        if not isinstance(values, list) or not values:
            raise BadRequest(f"grid {name[:64]} must be a non-empty list of values")
    count = math.prod(len(values) for values in grid.values())
    if count > MAX_SETS:
        raise BadRequest(f"the grid makes {count} workflows; a sweep makes at most {MAX_SETS}")
    names = list(grid)
    return [dict(zip(names, combination, strict=True)) for combination in itertools.product(*grid.values())]


def _listed(sets: Any) -> list[dict[str, Any]]:
    if not isinstance(sets, list) or not sets:
        raise BadRequest("sets is a non-empty list of objects of $name parameters and #name choices")
    if len(sets) > MAX_SETS:
        raise BadRequest(f"{len(sets)} sets sent; a sweep makes at most {MAX_SETS}")
    for number, one in enumerate(sets, 1):
        if not isinstance(one, dict):
            raise BadRequest(f"set {number} must be an object of $name parameters and #name choices")
        for name in one:
            _check_name(name, f"set {number}")
    return list(sets)


def _check_name(name: str, where: str) -> None:
    if not _NAME.fullmatch(name):
        raise BadRequest(
            f"{where}: {name[:64]!r} is not a parameter; names are $name parameters and #name choices"
        )
