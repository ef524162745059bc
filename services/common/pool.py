"""The one asyncpg pool per process, and how connection failures are described.

Every wait on the database through the pool is bounded (README, "Configuration"):

- a statement: PostgreSQL's `statement_timeout` (DB_STATEMENT_TIMEOUT) cancels it
  on the server, which answers `query_canceled`; the connection stays usable;
- a lock: `lock_timeout` (DB_LOCK_TIMEOUT) ends the wait with `lock_not_available`;
- a server that accepted the connection but answers nothing (stalled, or the
  network to it): asyncpg's `command_timeout` (DB_COMMAND_TIMEOUT, by default a
  second above the statement timeout, so a live server always answers first)
  raises TimeoutError, and the connection is closed at once (`_close_if_unanswered`):
  asyncpg would otherwise send a CancelRequest over a new connection and wait as
  long again for it, and a connection whose statement may still be running is
  never handed out again;
- a free connection: every acquire waits at most DB_POOL_ACQUIRE_TIMEOUT
  (`BoundedPool`), which also bounds how long a release waits for a cancelled
  statement before it closes the connection;
- one row lock cannot take the pool: at most DB_ROW_LOCK_WAITERS calls of a
  process hold a connection for work that waits on the same row
  (`acquire(locking=key)`); the others wait in the process, without a
  connection, for at most DB_LOCK_TIMEOUT, and then end the way the next call
  ahead of them ends (`RowLockWaitTimeout`): a lock timeout when the row stayed
  locked, an outage when the database does not answer.

The RPC's own deadline needs nothing here: gRPC cancels the handler when it
passes, and asyncpg turns that into a CancelRequest for the running statement.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from services.common.metrics import observe_query
from services.common.settings import DatabaseSettings
from services.common.types import DbConnection


class PoolAcquireTimeout(TimeoutError):
    """No pooled connection became free within DB_POOL_ACQUIRE_TIMEOUT.

    `busy`: every connection of the pool was open and in use (the pool is
    exhausted), rather than a new connection not being opened in time.
    A TimeoutError, so code outside RPCs treats it as an outage like any other.
    """

    def __init__(self, timeout_s: float, *, busy: bool) -> None:
        self.busy = busy
        state = "every connection is in use" if busy else "no connection could be opened"
        super().__init__(f"no database connection within {timeout_s:g}s ({state})")


class RowLockWaitTimeout(Exception):
    """A call waited DB_LOCK_TIMEOUT in the process for its turn at a row lock.

    `ahead`: how the next call ahead of it on that row ended (None: successfully,
    or not within the settling time), so that the caller can tell a locked row
    (those calls ran into the lock timeout) from a database that does not answer
    (they ran into an outage, a stall or an exhausted pool).
    """

    def __init__(self, key: Hashable, timeout_s: float, ahead: BaseException | None) -> None:
        self.key = key
        self.ahead = ahead
        super().__init__(f"waited {timeout_s:g}s for the row lock of {key}")


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


def _close_if_unanswered(conn: asyncpg.Connection) -> Any:
    """A query logger for a pooled connection: a statement that got no answer in
    time (command_timeout) closes the connection.

    The logger runs on the loop right after the statement raised, before the
    caller's ROLLBACK or the pool's release could wait on the connection again.
    """
    ref = weakref.ref(conn)

    def close(record: Any) -> None:
        connection = ref()
        if (
            isinstance(record.exception, TimeoutError)
            and connection is not None
            and not connection.is_closed()
        ):
            connection.terminate()

    return close


async def _init_pooled_connection(conn: asyncpg.Connection) -> None:
    await _init_connection(conn)
    conn.add_query_logger(_close_if_unanswered(conn))


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing beyond what asyncpg always does (roll
    back an open transaction, drop listeners). Its default reset is one more round
    trip per call (`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL`) to undo session state the services never create: they change settings
    only transaction-locally (set_config(..., true)), take no session advisory
    locks, keep no cursors past a transaction and LISTEN on connections of their own.
    tests/common/test_session_state.py keeps it so."""


def connect_kwargs(settings: DatabaseSettings, application_name: str) -> dict[str, Any]:
    return {
        "dsn": settings.require_url(),
        "timeout": settings.connect_timeout_s,
        "statement_cache_size": settings.statement_cache_size,
        "server_settings": {"application_name": application_name},
    }


def _milliseconds(seconds: float) -> str:
    return str(round(seconds * 1000))


def bounded_connect_kwargs(
    settings: DatabaseSettings,
    application_name: str,
    session_settings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`connect_kwargs` with the statement, lock and stall timeouts of the services'
    pool, and the service's own `session_settings`."""
    kwargs = connect_kwargs(settings, application_name)
    kwargs["server_settings"] = {
        **kwargs["server_settings"],
        **(session_settings or {}),
        # Session defaults set at connection start: asyncpg's reset on release
        # (RESET ALL) returns to them, so no call can leave them changed.
        "statement_timeout": _milliseconds(settings.statement_timeout_s),
        "lock_timeout": _milliseconds(settings.lock_timeout_s),
    }
    kwargs["command_timeout"] = settings.client_command_timeout()
    return kwargs


async def connect(settings: DatabaseSettings, application_name: str) -> asyncpg.Connection:
    """A single connection with the pool's codecs (CLI tools, listeners); no timeouts."""
    conn: asyncpg.Connection = await asyncpg.connect(**connect_kwargs(settings, application_name))
    await _init_connection(conn)
    return conn


Exit = asyncio.Future["BaseException | None"]


@dataclass
class _Slot:
    semaphore: asyncio.Semaphore
    # Resolved when the next holder leaves, with how it ended (None: successfully).
    next_exit: Exit
    users: int = 0  # holders and waiters: the slot is dropped when none is left


class KeyedGate:
    """At most `limit` holders per key at once; the others wait, each at most `timeout_s`.

    A waiter whose time is up does not guess why the holders are slow: it waits
    (at most `settle_s`, the longest a holder can take to end) for the next holder
    to leave and reports how that one ended (`RowLockWaitTimeout.ahead`).
    """

    def __init__(self, limit: int, timeout_s: float | None, settle_s: float | None) -> None:
        self._limit = limit
        self._timeout_s = timeout_s
        self._settle_s = settle_s
        self._slots: dict[Hashable, _Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    async def enter(self, key: Hashable) -> None:
        slot = self._slots.get(key)
        if slot is None:
            future: Exit = asyncio.get_running_loop().create_future()
            slot = self._slots[key] = _Slot(asyncio.Semaphore(self._limit), future)
        slot.users += 1
        try:
            try:
                async with asyncio.timeout(self._timeout_s):
                    await slot.semaphore.acquire()
                return
            except TimeoutError:
                pass
            ahead = None
            try:
                async with asyncio.timeout(self._settle_s):
                    ahead = await asyncio.shield(slot.next_exit)
            except TimeoutError:
                pass
            raise RowLockWaitTimeout(key, self._timeout_s or 0.0, ahead)
        except BaseException:
            self._forget(key, slot)
            raise

    def leave(self, key: Hashable, failure: BaseException | None = None) -> None:
        """A holder leaves; `failure`: the exception its work ended with, if any."""
        slot = self._slots[key]
        exited, slot.next_exit = slot.next_exit, asyncio.get_running_loop().create_future()
        exited.set_result(failure)
        slot.semaphore.release()
        self._forget(key, slot)

    def _forget(self, key: Hashable, slot: _Slot) -> None:
        slot.users -= 1
        if slot.users == 0:
            del self._slots[key]


if TYPE_CHECKING:  # generic only in the type stubs
    _AcquireContext: TypeAlias = PoolAcquireContext[asyncpg.Record]
else:
    _AcquireContext = PoolAcquireContext


class _BoundedAcquire(_AcquireContext):
    """asyncpg's acquire context, with the pool-exhaustion error and the row gate."""

    __slots__ = ("_key",)

    def __init__(self, pool: BoundedPool, timeout: float, key: Hashable | None) -> None:
        super().__init__(pool, timeout)
        self._key = key

    async def __aenter__(self) -> PoolConnectionProxy[asyncpg.Record]:
        pool = self.pool
        assert isinstance(pool, BoundedPool)
        if self._key is not None:
            await pool.row_gate.enter(self._key)
        try:
            try:
                return await super().__aenter__()
            except TimeoutError as exc:
                raise pool.acquire_timeout_error(self.timeout) from exc
        except BaseException as failure:
            if self._key is not None:
                pool.row_gate.leave(self._key, failure)
            raise

    async def __aexit__(self, *exc: object) -> None:
        try:
            await super().__aexit__(*exc)
        finally:
            if self._key is not None:
                assert isinstance(self.pool, BoundedPool)
                failure = exc[1] if len(exc) > 1 else None
                self.pool.row_gate.leave(
                    self._key, failure if isinstance(failure, BaseException) else None
                )


_P = ParamSpec("_P")
_T = TypeVar("_T")


class BoundedPool(asyncpg.Pool):
    """asyncpg's pool whose every acquire waits at most DB_POOL_ACQUIRE_TIMEOUT.

    `acquire(locking=key)` (with `async with`) is for work that will wait on the
    row lock `key` (e.g. a thread's id): see the module docstring.
    """

    __slots__ = ("_acquire_timeout_s", "row_gate")

    def __init__(
        self, *args: Any, acquire_timeout_s: float, row_gate: KeyedGate, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._acquire_timeout_s = acquire_timeout_s
        self.row_gate = row_gate

    def acquire(
        self, *, timeout: float | None = None, locking: Hashable | None = None
    ) -> PoolAcquireContext[asyncpg.Record]:
        return _BoundedAcquire(
            self, self._acquire_timeout_s if timeout is None else timeout, locking
        )

    # One call's work on one connection, like Synapse's runInteraction: the
    # servicers hand a store function and its arguments, never hold a connection.
    async def run(
        self,
        work: Callable[Concatenate[DbConnection, _P], Awaitable[_T]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """`work(conn, ...)` on a pooled connection, in autocommit."""
        async with self.acquire() as conn:
            return await work(conn, *args, **kwargs)

    async def run_in_transaction(
        self,
        work: Callable[Concatenate[DbConnection, _P], Awaitable[_T]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """`work(conn, ...)` in one transaction."""
        async with self.acquire() as conn, conn.transaction():
            return await work(conn, *args, **kwargs)

    async def run_locking(
        self,
        key: Hashable,
        work: Callable[Concatenate[DbConnection, _P], Awaitable[_T]],
        /,
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """`work(conn, ...)` that will wait on the row lock `key` (see `acquire`)."""
        async with self.acquire(locking=key) as conn:
            return await work(conn, *args, **kwargs)

    def acquire_timeout_error(self, timeout_s: float | None) -> PoolAcquireTimeout:
        busy = self.get_idle_size() == 0 and self.get_size() >= self.get_max_size()
        return PoolAcquireTimeout(timeout_s or 0.0, busy=busy)


async def create_pool(
    settings: DatabaseSettings,
    application_name: str,
    session_settings: Mapping[str, str] | None = None,
) -> BoundedPool:
    """The process's pool: spec defaults of 20 connections, 30 s idle, 2 s connect,
    and the bounded waits of the module docstring."""
    pool = BoundedPool(
        **bounded_connect_kwargs(settings, application_name, session_settings),
        min_size=min(settings.pool_min_size, settings.pool_max_size),
        max_size=settings.pool_max_size,
        # Idle connections are closed after this long (the spec's idleTimeoutMillis).
        max_inactive_connection_lifetime=settings.pool_idle_timeout_s,
        init=_init_pooled_connection,
        reset=_keep_session,
        # asyncpg.create_pool's defaults, which the constructor does not have.
        max_queries=50000,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        acquire_timeout_s=settings.pool_acquire_timeout_s,
        row_gate=KeyedGate(
            settings.row_lock_waiters,
            timeout_s=settings.lock_timeout_s or None,
            # The longest a call holding a place takes to end: a connection, then
            # statements each bounded by the command timeout (or the lock timeout).
            settle_s=settings.pool_acquire_timeout_s
            + (settings.client_command_timeout() or settings.lock_timeout_s),
        ),
    )
    await pool
    return pool
