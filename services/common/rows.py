"""Rows as typed dataclasses: selected by one column list, built by column name.

Every store derives its SELECT and RETURNING lists from a row type's fields, so a
new field is selected everywhere, and builds rows by name, never by position: a
reordered SELECT cannot shift fields. The lists are composed from these types at
import time, never from input; every value in a statement stays a parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from operator import itemgetter
from typing import Any, Protocol, TypeVar

Row = TypeVar("Row")


class Record(Protocol):
    """What a row is built from: an asyncpg.Record, or any mapping of column names."""

    def __getitem__(self, column: str, /) -> Any: ...


# Rows are built on every read path: each type's names are worked out once.
_FIELD_NAMES: dict[tuple[type[Any], frozenset[str]], tuple[str, ...]] = {}


def field_names(row_type: type[Any], *, exclude: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """The columns of `row_type`: its dataclass fields, less `exclude` (derived ones)."""
    key = (row_type, exclude)
    names = _FIELD_NAMES.get(key)
    if names is None:
        names = _FIELD_NAMES[key] = tuple(f.name for f in fields(row_type) if f.name not in exclude)
    return names


def column_list(
    row_type: type[Any], *, alias: str = "", exclude: frozenset[str] = frozenset()
) -> str:
    """`row_type`'s columns for a SELECT or RETURNING list, qualified by `alias` if given."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + name for name in field_names(row_type, exclude=exclude))


# Every update moves updated_at forward, even two within one clock tick, so a
# client comparing versions by it never sees an update that did not advance it.
UPDATED_AT_ADVANCES = "updated_at = greatest(now(), updated_at + interval '1 microsecond')"


def masked_update(table: str, columns: Sequence[str], returning: str) -> str:
    """One static UPDATE serving every field mask (AIP-134): `$1` is the row's id;
    column i keeps its value unless its flag `$(2i+2)` is set, then takes
    `$(2i+3)`. Composed from constants at import time, like the column lists."""
    sets = [
        f"{column} = CASE WHEN ${2 * i + 2} THEN ${2 * i + 3} ELSE {column} END"
        for i, column in enumerate(columns)
    ]
    assignments = ", ".join([*sets, UPDATED_AT_ADVANCES])
    return f"UPDATE {table} SET {assignments} WHERE id = $1 RETURNING {returning}"  # noqa: S608


# Per row type (and exclusions and renames): one C-level getter of its columns
# by name, in field order, so a row is built positionally without a dict.
_GETTERS: dict[tuple[type[Any], frozenset[str], tuple[tuple[str, str], ...]], itemgetter[Any]] = {}


def _getter(
    row_type: type[Any], exclude: frozenset[str], renamed: tuple[tuple[str, str], ...]
) -> itemgetter[Any]:
    key = (row_type, exclude, renamed)
    getter = _GETTERS.get(key)
    if getter is None:
        columns = dict(renamed)
        names = [columns.get(name, name) for name in field_names(row_type, exclude=exclude)]
        if len(names) < 2:  # itemgetter of one name returns the value, not a tuple
            raise TypeError(f"{row_type.__name__}: a row type has two columns at least")
        getter = _GETTERS[key] = itemgetter(*names)
    return getter


def row_of(
    row_type: type[Row],
    record: Record,
    *,
    exclude: frozenset[str] = frozenset(),
    renamed: Mapping[str, str] | None = None,
) -> Row:
    """A `row_type` from `record` by column name (the record may carry more columns).
    `renamed` maps a field to the column holding it when a join renamed it."""
    getter = _getter(row_type, exclude, tuple(renamed.items()) if renamed else ())
    return row_type(*getter(record))
