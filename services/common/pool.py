"""The one asyncpg pool per process, and how connection failures are described."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from services.common.metrics import observe_query
from services.common.settings import DatabaseSettings

# Failures that mean "the database cannot be reached right now" rather than a bug:
# the service answers UNAVAILABLE for them and the CLI prints one line.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
    # A pooled connection whose server went away mid-operation can surface as
    # "cannot switch to state N" on its next use (MagicStack/asyncpg#1069); the
    # pool replaces it, so for callers it is an outage, not a bug.
    asyncpg.InternalClientError,
)


# What a query can raise when the database is down or refusing: health probes.
QUERY_FAILURES: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)

# Everything opening a connection can raise for a bad URL or an unreachable,
# misconfigured or refusing server: reported as one line by the command-line tools.
CONNECT_FAILURES: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    ValueError,
)


def describe_connect_error(exc: BaseException) -> str:
    """One line saying why a connection failed, without the password."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out connecting to the database"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"the database refused the credentials: {exc}"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"the database does not exist: {exc}"
    if isinstance(exc, ValueError | asyncpg.ClientConfigurationError):
        return f"DATABASE_URL is not a valid PostgreSQL URL: {exc}"
    return f"cannot connect to the database: {exc.__class__.__name__}: {exc}"


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Every query's execution time goes to the metrics, by statement name.
    conn.add_query_logger(observe_query)
    # JSONB columns come back as Python objects, and go in from them.
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
    )


def connect_kwargs(settings: DatabaseSettings, application_name: str) -> dict[str, Any]:
    return {
        "dsn": settings.require_url(),
        "timeout": settings.connect_timeout_s,
        "statement_cache_size": settings.statement_cache_size,
        "server_settings": {"application_name": application_name},
    }


async def connect(settings: DatabaseSettings, application_name: str) -> asyncpg.Connection:
    """A single connection with the pool's codecs (CLI tools, listeners)."""
    conn: asyncpg.Connection = await asyncpg.connect(**connect_kwargs(settings, application_name))
    await _init_connection(conn)
    return conn


async def create_pool(settings: DatabaseSettings, application_name: str) -> asyncpg.Pool:
    """The process's pool: spec defaults of 20 connections, 30 s idle, 2 s connect."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        **connect_kwargs(settings, application_name),
        min_size=min(settings.pool_min_size, settings.pool_max_size),
        max_size=settings.pool_max_size,
        # Idle connections are closed after this long (the spec's idleTimeoutMillis).
        max_inactive_connection_lifetime=settings.pool_idle_timeout_s,
        init=_init_connection,
    )
    return pool
