"""The grpc.aio server bootstrap every service uses.

It builds the process's pool, the server with the shared interceptor and message
size limits, the standard health service (overall and per-service status) and
server reflection (so `grpcurl list` / `describe` work), then serves until
SIGTERM/SIGINT: health goes NOT_SERVING, the server stops accepting, in-flight
RPCs get the grace period to finish, shutdown hooks run and the pool closes.

Health has two meanings. Readiness, the overall status ("") and the service's
own name, follows the database (health_watch.py): take this process out of
rotation while it cannot serve. Liveness, the name `liveness`, is SERVING from
start until shutdown whatever the database does: a liveness probe on readiness
would restart every process during a database outage, which cures nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvloop
from chat.v1 import admin_pb2_grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from services.common import tracing
from services.common.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from services.common.admin import AdminServicer
from services.common.health_watch import DatabaseHealthWatch
from services.common.identity import require_active_caller
from services.common.interceptors import ServiceInterceptor
from services.common.logs import configure_logging
from services.common.metrics import MetricsEndpoint
from services.common.pool import (
    CONNECT_FAILURES,
    BoundedPool,
    connect,
    create_pool,
    describe_connect_error,
)
from services.common.settings import MissingDatabaseUrl, ServiceSettings
from services.common.workers import WorkerRole, supervise

log = logging.getLogger(__name__)

ShutdownHook = Callable[[], Awaitable[None]]

# Health service name of liveness (Kubernetes `livenessProbe: grpc: {service: liveness}`).
LIVENESS = "liveness"


@dataclass
class Runtime:
    """What a service's registration gets: settings, the pool, and two kinds of hooks.

    `stopping_hooks` run when shutdown begins, before in-flight RPCs are drained
    (e.g. end long-lived streams with a status clients resume from);
    `shutdown_hooks` run after the server stopped, before the pool closes.
    """

    name: str
    settings: ServiceSettings
    pool: BoundedPool
    stopping_hooks: list[ShutdownHook] = field(default_factory=list)
    shutdown_hooks: list[ShutdownHook] = field(default_factory=list)
    # Service-owned objects worth reaching from tests and tooling (e.g. the stream hub).
    extras: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceDefinition:
    name: str  # "users", "threads", "messages": default port, application_name
    full_name: str  # the proto service, e.g. "chat.v1.UsersService"
    register: Callable[[grpc.aio.Server, Runtime], Awaitable[None]]
    # PostgreSQL settings of every pooled connection, set at connection start
    # (so asyncpg's RESET ALL on release keeps them), e.g. the messages
    # service's chat.wake_after_commit.
    session_settings: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of_servicer(
        cls,
        name: str,
        service: ServiceDescriptor,
        add_to_server: Callable[[Any, grpc.aio.Server], None],
        servicer: Callable[[Runtime], object],
    ) -> ServiceDefinition:
        """A service whose servicer needs only the runtime (pool and settings)."""

        async def register(server: grpc.aio.Server, runtime: Runtime) -> None:
            add_to_server(servicer(runtime), server)

        return cls(name=name, full_name=service.full_name, register=register)


@dataclass
class RunningService:
    definition: ServiceDefinition
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    runtime: Runtime
    port: int
    database_watch: DatabaseHealthWatch
    metrics: MetricsEndpoint | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        grace = self.runtime.settings.shutdown_grace_s if grace is None else grace
        # Probes see NOT_SERVING first (liveness too: the process is ending), so
        # load balancers drain us before we stop.
        await self.health.enter_graceful_shutdown()
        # Refuse new RPCs first, then end the long-lived ones (streams) with a status
        # clients resume from, so the grace period drains only short unary calls.
        stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.sleep(0)
        await _run_hooks(self.runtime.stopping_hooks)
        await stopping
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await _run_hooks(self.runtime.shutdown_hooks)
        try:
            await asyncio.wait_for(self.runtime.pool.close(), timeout=max(grace, 1.0))
        except TimeoutError:
            self.runtime.pool.terminate()
        if self.metrics is not None:
            self.metrics.close()


async def _run_hooks(hooks: list[ShutdownHook]) -> None:
    for hook in reversed(hooks):
        try:
            await hook()
        except Exception:
            log.exception("shutdown hook failed")


# Calls gRPC core has accepted that the Python server has not picked up yet.
# grpc.aio picks calls up one at a time on the event loop, so a burst of opens
# (thousands of streams at once) queues here. Past core's defaults (1,000
# queued; then a growing random share of new calls, all of them from 3,000)
# new calls are refused before any handler sees them: the client gets a bare
# CANCELLED, a code no resume rule covers, and the service never logs the
# call (issue 13: ~650 of 3,000 streams opened at once). Set far above
# the service's own limits (e.g. STREAM_MAX_OPEN, answered RESOURCE_EXHAUSTED
# with a RetryInfo), and soft = hard: no random early rejection below it.
# Queued calls cost core memory (their headers and stream state), which is why
# core bounds them; a call still queued after 30 s is cancelled by core anyway
# (grpc.server_max_unrequested_time_in_server), whatever this limit.
MAX_PENDING_CALLS = 100_000


def server_options(settings: ServiceSettings, *, reuseport: bool = False) -> list[tuple[str, int]]:
    """Options of the server; `reuseport` only for a worker of WORKERS > 1 (workers.py).

    A single process binds its port exclusively: a second copy started by
    mistake fails to bind instead of silently taking half the connections.
    """
    return [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.so_reuseport", 1 if reuseport else 0),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ]


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from TLS_CERT_FILE/TLS_KEY_FILE (and TLS_CLIENT_CA_FILE for mTLS)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    chain = Path(settings.tls_cert_file).read_bytes()
    client_ca = (
        Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def start_service(
    definition: ServiceDefinition,
    settings: ServiceSettings,
    *,
    port: int | None = None,
    worker: int | None = None,
) -> RunningService:
    """Start serving `definition`; `port=0` picks a free port (tests).

    `worker`: this process is worker `worker` (1-based) of WORKERS > 1: it binds
    with SO_REUSEPORT and serves /metrics on its own port.
    """
    pool = await create_pool(
        settings,
        application_name=f"chat-{definition.name}",
        session_settings=definition.session_settings,
    )
    runtime = Runtime(definition.name, settings, pool)
    try:
        server = grpc.aio.server(
            interceptors=[
                ServiceInterceptor(
                    settings.token_list(),
                    check_caller=functools.partial(require_active_caller, pool),
                )
            ],
            options=server_options(settings, reuseport=worker is not None),
        )
        await definition.register(server, runtime)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(pool), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [
                definition.full_name,
                ADMIN_SERVICE_NAME,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        chosen = settings.port_for(definition.name) if port is None else port
        address = f"{settings.grpc_host}:{chosen}"
        credentials = server_credentials(settings)
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
        await server.start()
    except BaseException:
        await pool.close()
        raise
    names = ("", definition.full_name)
    # Liveness is set once and left to enter_graceful_shutdown(); the watch moves readiness only.
    for name in (LIVENESS, *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    watch = DatabaseHealthWatch(
        functools.partial(connect, settings, f"chat-{definition.name}-health"),
        health_servicer,
        names,
        interval_s=settings.health_check_interval_s,
        timeout_s=settings.health_check_timeout_s,
        threshold=settings.health_failure_threshold,
    )
    running = RunningService(definition, server, health_servicer, runtime, bound, watch)
    metrics_port = settings.metrics_port_for(definition.name, worker or 1)
    if metrics_port:
        try:
            running.metrics = MetricsEndpoint(metrics_port, pool, settings.metrics_bind_host())
        except OSError as exc:
            # Serving traffic matters more than exposing metrics: say so loudly, go on.
            log.error("metrics endpoint not started on port %d: %s", metrics_port, exc)
    running.background.append(asyncio.create_task(watch.run(), name="database-health"))
    return running


async def _serve_until_signalled(
    definition: ServiceDefinition, settings: ServiceSettings, role: WorkerRole | None = None
) -> None:
    running = await start_service(definition, settings, worker=role.index if role else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if role is None:
        log.info("%s serving %s on port %d", definition.name, definition.full_name, running.port)
    else:
        # Not the "serving ... on port" line: the supervisor logs that once, for all.
        log.info("%s worker %d ready on port %d", definition.name, role.index, running.port)
        role.report_ready()
        role.watch_supervisor(loop, stop)
    await stop.wait()
    log.info("%s shutting down (grace %.1fs)", definition.name, settings.shutdown_grace_s)
    await running.stop()
    log.info("%s stopped", definition.name)


def run_service(definition: ServiceDefinition) -> int:
    """Entry point of `python -m services.<name>`: serve until signalled."""
    try:
        settings = ServiceSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        # A rule over several settings (a model validator) has no single location.
        where = f"setting {first['loc'][0]}" if first["loc"] else "settings"
        print(f"{definition.name}: error: invalid {where}: {first['msg']}", file=sys.stderr)
        return 2
    role = WorkerRole.from_environment()
    configure_logging(
        settings.log_level,
        definition.name,
        settings.rpc_log_level,
        settings.log_format,
        worker=role.index if role else None,
    )
    try:
        tracing.configure_tracing(definition.name)
    except ValueError as exc:
        print(f"{definition.name}: error: {exc}", file=sys.stderr)
        return 2
    if not settings.token_list() and role is None:
        log.warning("AUTH_TOKENS is not set: any caller is accepted (fine for development only)")
    if role is None and settings.workers > 1:
        try:
            return supervise(definition.name, definition.full_name, settings)
        finally:
            tracing.shutdown_tracing()
    try:
        uvloop.run(_serve_until_signalled(definition, settings, role))
    except MissingDatabaseUrl as exc:
        print(f"{definition.name}: error: {exc}", file=sys.stderr)
        return 1
    except CONNECT_FAILURES as exc:
        print(f"{definition.name}: error: {describe_connect_error(exc)}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        print(f"{definition.name}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        tracing.shutdown_tracing()  # export the spans still buffered
    return 0
