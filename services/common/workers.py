"""WORKERS=N: N processes of one service on one port (SO_REUSEPORT), and their supervisor.

With WORKERS=1 (the default) `python -m services.<name>` is the server, as
before, and binds its port exclusively. With WORKERS=N > 1 that process is a
supervisor that serves nothing itself:

- It reserves the port: a plain bind proves it free (or picks a free one for
  GRPC_PORT=0), then a socket with SO_REUSEPORT holds it, bound but never
  listening, for the supervisor's life (grpc's examples/python/multiprocessing
  does the same). The kernel spreads incoming connections over the workers'
  listening sockets only, so the reservation takes no traffic; and while it is
  held no process without SO_REUSEPORT can take the port.
- It starts N workers, `python -m services.<name>` again (a fresh interpreter,
  so no gRPC state crosses a fork), each told its index, the port, a pipe to
  report ready on and a lifeline pipe (WORKER_ENV). Each worker is a whole
  service process: its own pool, health probe, stream hub and LISTEN
  connection, and its own /metrics on METRICS_PORT + 100 x (i - 1).
- When every worker reported ready it logs `<name> serving <service> on port
  <port> (N workers)`, the line tools wait for, once.
- SIGTERM or SIGINT: forwarded to every worker as SIGTERM, so each shuts down as
  a single process does (health NOT_SERVING, streams ended UNAVAILABLE
  SHUTTING_DOWN, calls drained for SHUTDOWN_GRACE_PERIOD); the supervisor exits
  0 when every worker did. A worker still running 2 x SHUTDOWN_GRACE_PERIOD +
  STOP_MARGIN_S after the signal is killed, and the exit is then 1.
- A worker that exits unasked after it served is replaced at once (same index
  and port); the others keep serving and keep their streams. Its calls in
  flight fail UNAVAILABLE and its streams end; clients retry and resume from
  their cursors, on whichever worker their new connection reaches. A worker
  that exits before it is ready (at start-up, or a replacement) means the
  service cannot start (no database, bad configuration): the supervisor stops
  the others and exits 1, as a single process failing at start-up does, and
  the process manager (Kubernetes, compose, `make run`) decides what next.
  A restart is not delayed: a worker's start-up (about a second) paces a
  worker that keeps crashing after it served.
- If the supervisor itself dies (SIGKILL), its end of the lifeline closes and
  every worker shuts down gracefully: no orphan keeps serving the port.

Database connections: each worker opens up to DB_POOL_MAX_SIZE pooled
connections, one health probe connection and, in the messages service, one
LISTEN connection (WORKER_OWN_CONNECTIONS). The supervisor warns at start-up
when N times that exceeds what the server allows (max_connections less
superuser_reserved_connections); it cannot see the other services' share.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from services.common.pool import CONNECT_FAILURES, connect
from services.common.settings import MissingDatabaseUrl, ServiceSettings

log = logging.getLogger(__name__)

# Set by the supervisor in each worker's environment: "index:ready_fd:lifeline_fd".
WORKER_ENV = "CHAT_WORKER"
# How often the supervisor looks at its workers and forwards a signal (seconds).
POLL_S = 0.1
# Past 2 x SHUTDOWN_GRACE_PERIOD (drain, then pool close) plus this, a worker
# that has not exited after the stop signal is killed.
STOP_MARGIN_S = 15.0
# Connections a worker holds outside its pool: the health probe's, and the
# messages service's LISTEN connection (streams/listener.py).
WORKER_OWN_CONNECTIONS = {"users": 1, "threads": 1, "messages": 2}


@dataclass(frozen=True)
class WorkerRole:
    """What the supervisor told a worker (WORKER_ENV)."""

    index: int
    ready_fd: int
    lifeline_fd: int

    @classmethod
    def from_environment(cls) -> WorkerRole | None:
        raw = os.environ.get(WORKER_ENV)
        if not raw:
            return None
        index, ready_fd, lifeline_fd = (int(part) for part in raw.split(":"))
        return cls(index, ready_fd, lifeline_fd)

    def report_ready(self) -> None:
        try:
            os.write(self.ready_fd, b"ready")
        except OSError:  # the supervisor is gone: the lifeline stops this worker
            pass
        finally:
            os.close(self.ready_fd)

    def watch_supervisor(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        """Stop gracefully when the supervisor is gone (the lifeline reads EOF)."""

        def gone() -> None:
            loop.remove_reader(self.lifeline_fd)
            if not stop.is_set():
                log.warning("worker %d: the supervisor is gone; shutting down", self.index)
                stop.set()

        loop.add_reader(self.lifeline_fd, gone)


def connections_needed(name: str, settings: ServiceSettings) -> int:
    """Most connections the service's workers hold at once."""
    return settings.workers * (settings.pool_max_size + WORKER_OWN_CONNECTIONS[name])


async def _connections_allowed(settings: ServiceSettings, name: str) -> int:
    conn = await asyncio.wait_for(
        connect(settings, f"chat-{name}-supervisor"), timeout=settings.connect_timeout_s
    )
    try:
        total = int(await conn.fetchval("SHOW max_connections"))
        reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
    finally:
        await conn.close()
    return total - reserved


_CHECK_FAILURES: tuple[type[BaseException], ...] = (TimeoutError, *CONNECT_FAILURES)


def warn_if_connections_short(name: str, settings: ServiceSettings) -> None:
    needed = connections_needed(name, settings)
    try:
        allowed = asyncio.run(_connections_allowed(settings, name))
    except _CHECK_FAILURES as exc:
        # The workers will say why the database cannot be reached.
        log.debug("max_connections not checked: %s", exc)
        return
    if needed > allowed:
        log.warning(
            "%d workers x (DB_POOL_MAX_SIZE %d + %d own) = %d connections, more than the "
            "%d this PostgreSQL allows (max_connections - superuser_reserved_connections): "
            "lower DB_POOL_MAX_SIZE or WORKERS, or raise max_connections",
            settings.workers,
            settings.pool_max_size,
            WORKER_OWN_CONNECTIONS[name],
            needed,
            allowed,
        )


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket holding `port` (a free one when 0) for SO_REUSEPORT listeners.

    The port must be free first: a plain bind fails if any socket holds it, so
    a second copy of the service (whose workers would share the port too)
    is refused here as a single process is.
    """
    bare = host.removeprefix("[").removesuffix("]") or None
    family, kind, proto, _, address = socket.getaddrinfo(
        bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        chosen = probe.getsockname()[1]
    held = socket.socket(family, kind, proto)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((address[0], chosen, *address[2:]))
    except BaseException:
        held.close()
        raise
    return held


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    ready_fd: int | None  # read end; None once the worker reported ready
    serving: bool = False


# eq=False: a supervisor owns processes and a pipe; it is equal only to itself.
@dataclass(eq=False)
class Supervisor:
    """Runs WORKERS copies of `python -m <module>` on `port` until signalled."""

    name: str
    full_name: str
    module: str
    settings: ServiceSettings
    port: int
    workers: dict[int, _Worker] = field(default_factory=dict, init=False)
    _signalled: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._lifeline_read, self._lifeline_write = os.pipe()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signalled = signum

    def _spawn(self, index: int) -> None:
        ready_read, ready_write = os.pipe()
        env = {
            **os.environ,
            "GRPC_PORT": str(self.port),
            WORKER_ENV: f"{index}:{ready_write}:{self._lifeline_read}",
        }
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=env,
                pass_fds=(ready_write, self._lifeline_read),
            )
        finally:
            os.close(ready_write)  # the worker's copy is the only one: EOF when it dies
        self.workers[index] = _Worker(index, process, ready_read)
        log.info("%s worker %d started (pid %d)", self.name, index, process.pid)

    def _read_ready(self) -> None:
        """Wait up to POLL_S for ready reports; note them."""
        starting = {w.ready_fd: w for w in self.workers.values() if w.ready_fd is not None}
        if not starting:
            time.sleep(POLL_S)
            return
        readable, _, _ = select.select(list(starting), [], [], POLL_S)
        for fd in readable:
            worker = starting[fd]
            if os.read(fd, 16):
                worker.serving = True
            os.close(fd)  # ready, or EOF: the worker died before it was ready
            worker.ready_fd = None

    def _close(self, worker: _Worker) -> None:
        if worker.ready_fd is not None:
            os.close(worker.ready_fd)
            worker.ready_fd = None

    def _stop_all(self) -> int:
        """SIGTERM every worker and wait; 0 if each exited 0."""
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2 * self.settings.shutdown_grace_s + STOP_MARGIN_S
        clean = True
        for worker in self.workers.values():
            try:
                code = worker.process.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                log.error("%s worker %d did not stop in time: killed", self.name, worker.index)
                worker.process.kill()
                code = worker.process.wait()
            self._close(worker)
            # A worker stopped before it installed its handlers dies of the signal.
            clean = clean and (code == 0 or (code == -signal.SIGTERM and not worker.serving))
        return 0 if clean else 1

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            return self._supervise()
        finally:
            os.close(self._lifeline_write)
            os.close(self._lifeline_read)

    def _supervise(self) -> int:
        for index in range(1, self.settings.workers + 1):
            self._spawn(index)
        announced = False
        while self._signalled is None:
            self._read_ready()
            for worker in list(self.workers.values()):
                code = worker.process.poll()
                if code is None:
                    continue
                self._close(worker)
                if not worker.serving:
                    log.error(
                        "%s worker %d exited with code %d before it served: stopping the service",
                        self.name,
                        worker.index,
                        code,
                    )
                    self._stop_all()
                    return 1
                log.error(
                    "%s worker %d (pid %d) exited with code %d: replacing it",
                    self.name,
                    worker.index,
                    worker.process.pid,
                    code,
                )
                self._spawn(worker.index)
            if not announced and all(w.serving for w in self.workers.values()):
                announced = True
                # The line tools wait for (devtools/processes.py), once, with the shared port.
                log.info(
                    "%s serving %s on port %d (%d workers)",
                    self.name,
                    self.full_name,
                    self.port,
                    len(self.workers),
                )
        log.info(
            "%s shutting down %d workers (signal %d)", self.name, len(self.workers), self._signalled
        )
        code = self._stop_all()
        log.info("%s stopped", self.name)
        return code


def supervise(name: str, full_name: str, settings: ServiceSettings) -> int:
    """Entry point for WORKERS > 1: reserve the port, run the workers, exit as they did."""
    if settings.database_url is None:
        print(f"{name}: error: {MissingDatabaseUrl()}", file=sys.stderr)
        return 1
    host = settings.grpc_host
    try:
        held = reserve_port(host, settings.port_for(name))
    except OSError as exc:
        where = f"{host}:{settings.port_for(name)}"
        print(f"{name}: error: cannot bind {where}: {exc}", file=sys.stderr)
        return 1
    with held:
        port = held.getsockname()[1]
        warn_if_connections_short(name, settings)
        main = sys.modules["__main__"].__spec__
        module = main.name if main is not None else f"services.{name}"
        return Supervisor(name, full_name, module, settings, port).run()
