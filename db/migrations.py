"""Migration files: discovery, parsing and checksums.

A migration is `db/migrations/NNNN_name.sql` holding an up part and a down part:

    -- migrate:up
    ...SQL...
    -- migrate:down
    ...SQL...

A file whose header has `-- migrate:no-transaction` runs outside a transaction
(for statements such as CREATE INDEX CONCURRENTLY); its statements then run one by
one and must be safe to re-run (IF NOT EXISTS), since a failure can stop it midway.

Server-side functions are `db/functions/<topic>.sql`: plain SQL (`CREATE OR REPLACE
FUNCTION ...`), re-applied whenever their text changes (repeatable files, like
Flyway's `R__`); see db/runner.py and db/README.md.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import sqlparse

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
FUNCTIONS_DIR = Path(__file__).parent / "functions"

_FILENAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_UP = "-- migrate:up"
_DOWN = "-- migrate:down"
_NO_TRANSACTION = "-- migrate:no-transaction"
_SUPERSEDES = "-- migrate:supersedes"
_SUPERSEDES_LINE = re.compile(r"^-- migrate:supersedes (?P<checksum>[0-9a-f]{64})$")
_FUNCTION_FILENAME = re.compile(r"^[a-z0-9_]+\.sql$")
# The functions a file defines (by name, every overload): the runner fingerprints
# their live definitions and drops them on `down --to 0`.
_CREATE_FUNCTION = re.compile(
    r"\bCREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+(?:public\.)?([a-z_][a-z0-9_]*)\s*\(",
    re.IGNORECASE,
)


class MigrationFileError(ValueError):
    """A migration file is malformed (name, markers) or the set is inconsistent."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    up_sql: str
    down_sql: str
    transactional: bool
    checksum: str
    # Checksums of earlier texts this file amends (`-- migrate:supersedes`).
    supersedes: frozenset[str] = frozenset()

    @property
    def filename(self) -> str:
        return self.path.name

    def statements(self, direction: str) -> list[str]:
        """The part's statements one by one (for non-transactional migrations)."""
        sql = self.up_sql if direction == "up" else self.down_sql
        return [s for s in (part.strip() for part in sqlparse.split(sql)) if s]


def checksum_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_migration(path: Path) -> Migration:
    match = _FILENAME.match(path.name)
    if match is None:
        raise MigrationFileError(f"{path.name}: name must look like 0001_lower_snake_case.sql")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    markers = [i for i, line in enumerate(lines) if line.strip() in (_UP, _DOWN)]
    kinds = [lines[i].strip() for i in markers]
    if kinds != [_UP, _DOWN]:
        raise MigrationFileError(
            f"{path.name}: needs exactly one '{_UP}' line followed by one '{_DOWN}' line"
        )
    up_at, down_at = markers
    header = lines[:up_at]
    up_sql = "\n".join(lines[up_at + 1 : down_at]).strip()
    down_sql = "\n".join(lines[down_at + 1 :]).strip()
    if not up_sql:
        raise MigrationFileError(f"{path.name}: the up part is empty")
    supersedes = set()
    for line in (line.strip() for line in header):
        if line.startswith(_SUPERSEDES):
            found = _SUPERSEDES_LINE.match(line)
            if found is None:
                raise MigrationFileError(
                    f"{path.name}: '{line}' must be '{_SUPERSEDES} <sha256 in lower-case hex>'"
                )
            supersedes.add(found["checksum"])
    return Migration(
        version=int(match["version"]),
        name=match["name"],
        path=path,
        up_sql=up_sql,
        down_sql=down_sql,
        transactional=not any(line.strip() == _NO_TRANSACTION for line in header),
        checksum=checksum_of(text),
        supersedes=frozenset(supersedes),
    )


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """All migrations in version order; versions must run 1, 2, 3, ... without gaps."""
    migrations = sorted(
        (parse_migration(p) for p in directory.glob("*.sql")), key=lambda m: m.version
    )
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationFileError(
                f"{migration.filename}: expected version {expected:04d} "
                "(versions are sequential, without gaps or duplicates)"
            )
    return migrations


@dataclass(frozen=True)
class FunctionFile:
    """A repeatable file of server-side functions (`db/functions/<topic>.sql`)."""

    path: Path
    sql: str
    checksum: str
    functions: tuple[str, ...]  # names it defines, in file order

    @property
    def filename(self) -> str:
        return self.path.name


def parse_function_file(path: Path) -> FunctionFile:
    if _FUNCTION_FILENAME.match(path.name) is None:
        raise MigrationFileError(f"{path.name}: name must look like lower_snake_case.sql")
    text = path.read_text(encoding="utf-8")
    names = tuple(dict.fromkeys(m.lower() for m in _CREATE_FUNCTION.findall(text)))
    if not names:
        raise MigrationFileError(f"{path.name}: defines no function (CREATE OR REPLACE FUNCTION)")
    return FunctionFile(path=path, sql=text, checksum=checksum_of(text), functions=names)


def load_function_files(directory: Path = FUNCTIONS_DIR) -> list[FunctionFile]:
    """Every function file in file-name order (the order they are applied in)."""
    files = [parse_function_file(p) for p in sorted(directory.glob("*.sql"))]
    owners: dict[str, str] = {}
    for file in files:
        for name in file.functions:
            if name in owners:
                raise MigrationFileError(
                    f"{file.filename}: {name} is already defined in {owners[name]} "
                    "(each function has one file)"
                )
            owners[name] = file.filename
    return files
