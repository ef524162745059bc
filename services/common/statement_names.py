"""The registry of SQL statement names: metrics label a statement by its stable
name, never by its SQL text.

Stores declare their statements as `NAME = named("users.get", "SELECT ...")`; the
query timer (metrics.py) looks the text up here. Unregistered statements are labelled
"unnamed" (never by text, which would explode label cardinality).
"""

from __future__ import annotations

_NAMES: dict[str, str] = {}
UNNAMED = "unnamed"


def named(name: str, sql: str) -> str:
    """Register `sql` under `name` and return the SQL unchanged."""
    existing = _NAMES.get(sql)
    if existing is not None and existing != name:
        raise ValueError(f"the same SQL is registered as {existing!r} and {name!r}")
    _NAMES[sql] = name
    return sql


def name_of(sql: str) -> str:
    return _NAMES.get(sql, UNNAMED)
