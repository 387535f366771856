"""Names and tags, checked the same wherever they come in (runners and workflows alike)."""

from __future__ import annotations

import re

from control_plane.model.errors import BadRequest

TAG = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_TAGS = 10


def check_tags(value: str | list[str]) -> list[str]:
    """Tags as a list or a comma-separated string: at most 10, each of letters, digits and
    ``_ . : -`` (at most 64), each once, in the order given."""
    raw = [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else list(value)
    if len(raw) > MAX_TAGS:
        raise BadRequest(f"at most {MAX_TAGS} tags")
    tags = list(dict.fromkeys(raw))
    for tag in tags:
        if not TAG.fullmatch(tag):
            raise BadRequest(f"bad tag {tag[:80]!r}: use letters, digits and _ . : - (at most 64)")
    return tags
