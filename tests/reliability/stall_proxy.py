"""A TCP proxy in front of a real PostgreSQL that can stall it.

Stalled, the proxy is a database that froze (a stopped process, a saturated
host, a network path that drops everything but keeps connections up): it keeps
accepting connections and keeps every socket open, but forwards nothing in
either direction; bytes already read wait in the proxy. Resumed, everything held
flows on, in order, as a frozen server that wakes up would answer.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

CHUNK = 65536

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _upstream_of(url: str) -> tuple[str | None, str, int]:
    """(Unix socket path, or None; host; port) of the server `url` names."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    port = int(query.get("port") or parts.port or 5432)
    host = query.get("host") or parts.hostname or "localhost"
    if host.startswith("/"):  # a socket directory (the embedded server)
        return f"{host}/.s.PGSQL.{port}", host, port
    return None, host, port


class StallProxy:
    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._socket, self._host, self._port = _upstream_of(database_url)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0

    async def start(self) -> StallProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        """`database_url` through the proxy (same user, password and database)."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self._database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")]
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def _open_upstream(self) -> Streams:
        if self._socket is not None:
            return await asyncio.open_unix_connection(self._socket)
        return await asyncio.open_connection(self._host, self._port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.accepted += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()  # stalled: accepted, and nothing more
            try:
                up_reader, upstream = await self._open_upstream()
            except OSError:
                return
            self._writers.add(upstream)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._pump(reader, upstream))
                    group.create_task(self._pump(up_reader, writer))
            except* OSError:
                pass  # a side reset its connection: both ends are closed below
        finally:
            for end in (writer, upstream):
                if end is not None:
                    end.close()
                    self._writers.discard(end)
            self._tasks.discard(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await source.read(CHUNK)
                await self._flowing.wait()  # stalled: held here, the socket stays open
                if not data:
                    break
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def close(self) -> None:
        self._flowing.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with suppress(asyncio.CancelledError):
                await task
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
