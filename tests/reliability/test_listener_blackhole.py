"""The hub notices a dead listener: a LISTEN connection whose network path goes dead.

A blackholed TCP connection raises nothing: writes succeed, nothing ever comes
back, and no FIN or RST arrives. Notifications sent to it are lost without a
trace. The hub's heartbeat (`SELECT 1` every STREAM_LISTENER_HEARTBEAT, answered
within STREAM_LISTENER_HEARTBEAT_TIMEOUT) is what notices; the hub then drops
the connection, opens a new one after STREAM_LISTENER_RETRY (jittered) and
catches every feed up. A message written by another process while the path is
dead (its NOTIFY goes into the void) still arrives: through the periodic
catch-up read (STREAM_CATCH_UP_INTERVAL), and the listener is replaced within
its bound. (A send through this very process reaches its streams without the
listener at all: it wakes them itself after commit.)

The messages service runs as its own process with the defaults of `make run`;
its DATABASE_URL points at a TCP proxy in this test, which forwards to the test
server and can blackhole one connection: stop forwarding in both directions
while keeping both sockets open.

The listener's connection is found in pg_stat_activity (application_name
'chat-messages-listener', queried directly, not through the proxy): over TCP its
client_port is the local port of the proxy's upstream socket; over a Unix socket
(the embedded test server listens on one only) client_port is -1, so the
backend's pid is matched instead, read by the proxy from the server's
BackendKeyData message.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from chat.v1 import messages_pb2, messages_pb2_grpc

from devtools.processes import ServiceProcess, start_service_process
from services.messages.settings import MessagesSettings
from tests.factories import send as factory_send
from tests.messages.conftest import Room, new_room
from tests.rpc_errors import as_user

LISTENER_APPLICATION = "chat-messages-listener"  # services/messages/streams/listener.py

# The bound on noticing the dead listener and delivering what it missed, with the
# defaults of `make run` (services/messages/settings.py): the blackhole may start
# just after a heartbeat, so up to one interval passes before the next probe,
# which then waits its full timeout; the first reconnect waits at most
# STREAM_LISTENER_RETRY; the catch-up fetch follows. 5 + 5 + 1 = 11 s, and the
# rest is slack for a loaded machine.
_DEFAULTS = MessagesSettings.model_construct()  # the defaults, whatever the shell sets
EXPECTED_BOUND_S = (
    _DEFAULTS.listener_heartbeat_s
    + _DEFAULTS.listener_heartbeat_timeout_s
    + _DEFAULTS.listener_retry_s
)
DELIVERY_WAIT_S = 45.0
assert DELIVERY_WAIT_S > EXPECTED_BOUND_S

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CHUNK = 64 * 1024

Event = messages_pb2.StreamThreadMessagesResponse
if TYPE_CHECKING:
    Stream = grpc.aio.UnaryStreamCall[messages_pb2.StreamThreadMessagesRequest, Event]


@dataclass(eq=False)
class ProxiedConnection:
    """One client connection through the proxy and its upstream to the server."""

    downstream: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    upstream_port: int | None  # local port of the upstream socket (None: Unix socket)
    blackholed: bool = False
    backend_pid: int | None = None  # from the server's BackendKeyData, when readable
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # What the server -> client sniffer still has to parse.
    _pending_negotiations: int = 0
    _sniffing: bool = True
    _client_started: bool = False
    _server_bytes: bytearray = field(default_factory=bytearray)

    def blackhole(self) -> None:
        """From now on nothing passes either way, and neither socket is closed."""
        self.blackholed = True

    def close(self) -> None:
        for writer in (self.downstream, self.upstream):
            writer.close()

    def sniff_client(self, data: bytes) -> None:
        """Count SSL/GSS negotiation requests: the server answers each with one byte."""
        if self._client_started:
            return
        if len(data) >= 8:
            length, code = struct.unpack("!II", data[:8])
            if length == 8 and code in (_SSL_REQUEST, _GSSENC_REQUEST):
                self._pending_negotiations += 1
                return
        self._client_started = True  # the StartupMessage: after it, no more requests

    def sniff_server(self, data: bytes) -> None:
        """Find BackendKeyData ('K': the backend's pid) in the server's first messages."""
        if not self._sniffing:
            return
        buf = self._server_bytes
        buf.extend(data)
        while self._pending_negotiations and buf:
            answer = buf[0]
            del buf[0]
            self._pending_negotiations -= 1
            if answer in b"SG":  # encrypted from here on: nothing more to read
                self._sniffing = False
                buf.clear()
                return
        while len(buf) >= 5:
            kind = bytes(buf[0:1])
            (length,) = struct.unpack("!I", buf[1:5])
            if len(buf) < 1 + length:
                return
            body = bytes(buf[5 : 1 + length])
            del buf[: 1 + length]
            if kind == b"K":
                (self.backend_pid,) = struct.unpack("!i", body[:4])
            if kind in (b"K", b"Z", b"E"):  # pid known, ready, or failed: done
                self._sniffing = False
                buf.clear()
                return


class BlackholeProxy:
    """A TCP proxy to PostgreSQL that can blackhole single connections."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        query = dict(parse_qsl(parts.query))
        host = query.pop("host", None) or parts.hostname or "localhost"
        port = int(query.pop("port", None) or parts.port or 5432)
        self._unix_path = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._target = (host, port)
        self._url_parts = parts._replace(query=urlencode(query))
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections: list[ProxiedConnection] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The database URL through this proxy."""
        parts = self._url_parts
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._unix_path is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix_path)
                upstream_port = None
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
                upstream_port = int(up_writer.get_extra_info("sockname")[1])
        except OSError:
            writer.close()
            return
        conn = ProxiedConnection(writer, up_writer, upstream_port)
        self.connections.append(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, reader, up_writer, from_client=True)),
            asyncio.create_task(self._pump(conn, up_reader, writer, from_client=False)),
        ]

    async def _pump(
        self,
        conn: ProxiedConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        from_client: bool,
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                if conn.blackholed:
                    continue  # lost on the dead path; the sender never learns
                if from_client:
                    conn.sniff_client(data)
                else:
                    conn.sniff_server(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        # End of one side: passed on, unless the path is dead (then no FIN gets through).
        if not conn.blackholed:
            conn.close()

    def find(self, client_port: int | None, pid: int) -> ProxiedConnection:
        """The proxied connection that pg_stat_activity shows as `pid` / `client_port`."""
        if client_port is not None and client_port >= 0:  # over TCP: by port
            matches = [c for c in self.connections if c.upstream_port == client_port]
        else:  # over a Unix socket (client_port -1): by the backend's pid
            matches = [c for c in self.connections if c.backend_pid == pid]
        assert len(matches) == 1, (
            f"backend {pid} (client_port {client_port}) matches {len(matches)} proxied "
            f"connections: {[(c.upstream_port, c.backend_pid) for c in self.connections]}"
        )
        return matches[0]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self.connections:
            conn.close()
            for task in conn.tasks:
                task.cancel()
        await asyncio.gather(
            *(t for c in self.connections for t in c.tasks), return_exceptions=True
        )
        if self._server is not None:
            await self._server.wait_closed()


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[BlackholeProxy]:
    proxy = BlackholeProxy(database_url)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def messages_process(proxy: BlackholeProxy) -> AsyncIterator[ServiceProcess]:
    """The messages service with `make run`'s defaults, over the proxy."""
    proc = await start_service_process("messages", proxy.url)
    yield proc
    if proc.process.returncode is not None:
        print(f"messages exited {proc.process.returncode}:", *proc.log[-30:], sep="")
    with contextlib.suppress(TimeoutError):
        await proc.stop()


async def listeners(database_url: str) -> list[tuple[int, int | None]]:
    """(pid, client_port) of every hub listener on the test database, read directly."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid, client_port FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = current_database() ORDER BY pid",
            LISTENER_APPLICATION,
        )
    finally:
        await conn.close()
    return [(int(r["pid"]), r["client_port"]) for r in rows]


async def next_event(stream: Stream, wait_s: float) -> Event:
    event = await asyncio.wait_for(stream.read(), timeout=wait_s)
    assert isinstance(event, Event), event
    return event


async def test_a_blackholed_listener_is_replaced_and_nothing_is_missed(
    database_url: str,
    db_pool: asyncpg.Pool,
    proxy: BlackholeProxy,
    messages_process: ServiceProcess,
) -> None:
    room: Room = await new_room(db_pool)
    async with grpc.aio.insecure_channel(messages_process.address) as channel:
        stub = messages_pb2_grpc.MessagesServiceStub(channel)

        async def send(content: str) -> messages_pb2.Message:
            reply = await stub.SendMessage(
                messages_pb2.SendMessageRequest(
                    thread_id=room.thread_id,
                    user_id=room.member,
                    content=content,
                    request_id=str(uuid.uuid4()),
                ),
                metadata=as_user(room.member),
                timeout=10,
            )
            return reply.message

        stream = stub.StreamThreadMessages(
            messages_pb2.StreamThreadMessagesRequest(thread_id=room.thread_id),
            metadata=as_user(room.owner),
        )
        try:
            first = await next_event(stream, 30)
            assert first.WhichOneof("event") == "caught_up", first

            # Sanity: live delivery works through the proxy.
            sanity = await send("before the blackhole")
            event = await next_event(stream, 30)
            assert event.WhichOneof("event") == "created" and event.created.id == sanity.id

            # The listener's connection, as the server sees it, and as the proxy does.
            [(old_pid, old_port)] = await listeners(database_url)
            dead = proxy.find(old_port, old_pid)
            dead.blackhole()

            # Another writer's send (the SQL send function, as a second process
            # would commit it): its NOTIFY reaches nobody.
            missed_id = await factory_send(db_pool, room.thread_id, room.member, "into the void")
            acknowledged = time.monotonic()
            try:
                event = await next_event(stream, DELIVERY_WAIT_S)
            except TimeoutError:
                pytest.fail(
                    f"the message sent while the listener was blackholed did not arrive "
                    f"within {DELIVERY_WAIT_S:.0f} s (expected within about "
                    f"{EXPECTED_BOUND_S:.0f} s); log tail:\n" + "".join(messages_process.log[-20:])
                )
            delay = time.monotonic() - acknowledged
            print(
                f"\nmessage missed by the blackholed listener arrived {delay:.2f} s after its "
                f"send was acknowledged (bound {EXPECTED_BOUND_S:.0f} s + slack, "
                f"waited up to {DELIVERY_WAIT_S:.0f} s)"
            )
            assert event.WhichOneof("event") == "created" and event.created.id == missed_id

            # Exactly once: the next event is a fresh message, not the missed one again.
            after = await send("after the recovery")
            event = await next_event(stream, 30)
            assert event.WhichOneof("event") == "created", event
            assert event.created.id == after.id, "the missed message was delivered twice"
        finally:
            stream.cancel()

    # A new listener serves the process (within its bound, however fast the
    # catch-up read delivered); the dead one is no longer its listener.
    for _ in range(int(DELIVERY_WAIT_S / 0.1)):
        now = await listeners(database_url)
        fresh = [(pid, port) for pid, port in now if pid != old_pid]
        if fresh:
            break
        await asyncio.sleep(0.1)
    assert len(fresh) == 1, f"listeners now {now}, the blackholed one was {old_pid}"
    [(new_pid, new_port)] = fresh
    print(
        f"listener backends after recovery: {[pid for pid, _ in now]} "
        f"(blackholed {old_pid}: {'still open' if old_pid in dict(now) else 'gone'} "
        f"server-side; new {new_pid})"
    )
    replacement = proxy.find(new_port, new_pid)
    assert replacement is not dead and not replacement.blackholed
    assert messages_process.process.returncode is None, "the messages process died"
    assert any("heartbeat" in line for line in messages_process.log), "no heartbeat failure logged"
