"""`python -m services` (what `make run` runs): the whole system on one machine.

Uses DATABASE_URL when set, else starts the embedded PostgreSQL with its data in
EMBEDDED_PGDATA (default .data/postgres, kept across restarts). Applies
migrations, then starts the three services as separate processes on their
default ports and waits until each reports SERVING. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from db.migrations import load_migrations
from db.runner import Migrator
from services.common.embedded import EmbeddedPostgres
from services.common.health_client import check
from services.common.pool import CONNECT_FAILURES, connect, describe_connect_error
from services.common.settings import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, DatabaseSettings

STARTUP_TIMEOUT_S = 30.0
# After Ctrl-C, how long the services together get to drain (SHUTDOWN_GRACE_PERIOD,
# 10 s by default, plus their shutdown hooks) before they are killed.
STOP_TIMEOUT_S = 15.0
METRICS_DELTA = DEFAULT_METRICS_PORTS["users"] - DEFAULT_PORTS["users"]


async def _migrate(settings: DatabaseSettings) -> None:
    conn = await connect(settings, application_name="chat-migrate")
    try:
        for migration in await Migrator(conn, load_migrations()).up():
            print(f"applied {migration.filename}")
    finally:
        await conn.close()


def _start(name: str, env: dict[str, str], offset: int) -> subprocess.Popen[bytes]:
    ports = {"GRPC_PORT": str(DEFAULT_PORTS[name] + offset)}
    if env.get("METRICS_PORT") != "0":  # 0 turns metrics off everywhere
        ports["METRICS_PORT"] = str(DEFAULT_METRICS_PORTS[name] + offset)
    return subprocess.Popen([sys.executable, "-m", f"services.{name}"], env={**env, **ports})


def _wait_serving(procs: dict[str, subprocess.Popen[bytes]], ports: dict[str, int]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    pending = dict(procs)
    while pending:
        for name, proc in list(pending.items()):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
            if check(f"127.0.0.1:{ports[name]}", timeout=0.5) == "SERVING":
                del pending[name]
        if time.monotonic() > deadline:
            raise RuntimeError(f"not SERVING after {STARTUP_TIMEOUT_S:.0f}s: {', '.join(pending)}")
        time.sleep(0.2)


def _banner(ports: dict[str, int]) -> str:
    users, threads, messages = (ports[n] for n in ("users", "threads", "messages"))
    return f"""
chat backend is up:
  users     localhost:{users}     chat.v1.UsersService
  threads   localhost:{threads}     chat.v1.ThreadsService
  messages  localhost:{messages}     chat.v1.MessagesService
  metrics   http://localhost:{users + METRICS_DELTA}/metrics (users; threads and messages follow)

try (grpcurl is installed in .venv/bin):
  grpcurl -plaintext localhost:{users} list
  grpcurl -plaintext localhost:{threads} describe chat.v1.ThreadsService
  grpcurl -plaintext -d '{{"service":"chat.v1.MessagesService"}}' localhost:{messages} grpc.health.v1.Health/Check
  grpcurl -plaintext -d '{{"user":{{"email":"ada@example.com","username":"ada"}}}}' localhost:{users} chat.v1.UsersService/CreateUser

Ctrl-C stops everything.
"""


def _stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every service at once (each drains within its SHUTDOWN_GRACE_PERIOD),
    then kill whichever is still running STOP_TIMEOUT_S after, saying so: one
    deadline for all, so Ctrl-C ends everything in bounded time."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"run: {name} did not stop within {STOP_TIMEOUT_S:.0f}s: killed", file=sys.stderr)
            proc.kill()
            proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops everything the way Ctrl-C does


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services", description=__doc__)
    parser.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="add this to every default port (to run a second stack beside the first)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    ports = {name: port + args.port_offset for name, port in DEFAULT_PORTS.items()}
    signal.signal(signal.SIGTERM, _interrupt)
    settings = DatabaseSettings()
    embedded = None
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        if settings.database_url is None:
            embedded = EmbeddedPostgres(settings.embedded_pgdata)
            settings = settings.with_url(embedded.start())
            print(f"embedded PostgreSQL: data in {embedded.pgdata}")
        try:
            asyncio.run(_migrate(settings))
        except CONNECT_FAILURES as exc:
            print(f"run: error: {describe_connect_error(exc)}", file=sys.stderr)
            return 1
        env = {**os.environ, "DATABASE_URL": settings.require_url()}
        procs = {name: _start(name, env, args.port_offset) for name in ports}
        _wait_serving(procs, ports)
        print(_banner(ports), flush=True)
        while all(proc.poll() is None for proc in procs.values()):
            time.sleep(0.5)
        dead = [name for name, proc in procs.items() if proc.poll() is not None]
        print(f"run: error: {', '.join(dead)} stopped unexpectedly", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
        return 0
    except RuntimeError as exc:
        print(f"run: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
        _stop_all(procs)
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
