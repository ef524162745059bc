"""Typed configuration from the environment (pydantic-settings).

The environment variable names are the deployment contract: the same names work
for local processes, `make run` and the compose stack.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Default gRPC ports, one per service (the deployment contract).
DEFAULT_PORTS = {"users": 50051, "threads": 50052, "messages": 50053}
# Default Prometheus /metrics ports, one per service.
DEFAULT_METRICS_PORTS = {"users": 9101, "threads": 9102, "messages": 9103}
# WORKERS: processes of one service sharing its port (SO_REUSEPORT), at most
# MAX_WORKERS; worker i serves /metrics on METRICS_PORT + WORKER_METRICS_STRIDE
# x (i - 1), so the services' adjacent default metrics ports never collide.
MAX_WORKERS = 64
WORKER_METRICS_STRIDE = 100
# How much longer than DB_STATEMENT_TIMEOUT the client waits for an answer by
# default before it decides the server stalled (DB_COMMAND_TIMEOUT unset).
STALL_MARGIN_S = 1.0


class DatabaseSettings(BaseSettings):
    """How to reach PostgreSQL and how to pool connections to it.

    Pool defaults are the spec's pool config: max 20 connections, 30 s idle
    timeout, 2 s connection timeout.
    """

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    database_url: SecretStr | None = Field(default=None, alias="DATABASE_URL")
    pool_min_size: int = Field(default=1, ge=0, alias="DB_POOL_MIN_SIZE")
    pool_max_size: int = Field(default=20, ge=1, le=1000, alias="DB_POOL_MAX_SIZE")
    pool_idle_timeout_s: float = Field(default=30.0, gt=0, alias="DB_POOL_IDLE_TIMEOUT")
    connect_timeout_s: float = Field(default=2.0, gt=0, alias="DB_CONNECT_TIMEOUT")
    # asyncpg's per-connection prepared statement cache (the spec's "use prepared
    # statements"): statements are prepared once per connection and reused.
    statement_cache_size: int = Field(default=256, ge=0, alias="DB_STATEMENT_CACHE_SIZE")
    # Every wait on the database is bounded (the services' pool only; the
    # command-line tools and the LISTEN connection are not limited by these).
    # PostgreSQL's statement_timeout and lock_timeout of every pooled connection
    # (0 = off): a statement running longer is cancelled by the server, a wait for
    # a row or table lock longer fails with lock_not_available.
    statement_timeout_s: float = Field(default=5.0, ge=0, alias="DB_STATEMENT_TIMEOUT")
    lock_timeout_s: float = Field(default=2.0, ge=0, alias="DB_LOCK_TIMEOUT")
    # Longest wait for a free pooled connection.
    pool_acquire_timeout_s: float = Field(default=2.0, gt=0, alias="DB_POOL_ACQUIRE_TIMEOUT")
    # Client side: a statement the server has not answered after this long means
    # the server (or the network to it) stalled; the connection is closed. Unset:
    # DB_STATEMENT_TIMEOUT + 1 s, so a live server always cancels first.
    command_timeout_s: float | None = Field(default=None, gt=0, alias="DB_COMMAND_TIMEOUT")
    # Calls of one process that may hold a pooled connection while they wait for
    # the same row lock (a thread's); the others queue in the process, without a
    # connection, for at most DB_LOCK_TIMEOUT. One locked row then cannot take the pool.
    row_lock_waiters: int = Field(default=4, ge=1, alias="DB_ROW_LOCK_WAITERS")
    # Where `make run` / `python -m db` keep the embedded server's data when
    # DATABASE_URL is unset. Relative paths are taken from the working directory.
    embedded_pgdata: str = Field(default=".data/postgres", alias="EMBEDDED_PGDATA")

    def client_command_timeout(self) -> float | None:
        """DB_COMMAND_TIMEOUT, or DB_STATEMENT_TIMEOUT + 1 s (none when both are off)."""
        if self.command_timeout_s is not None:
            return self.command_timeout_s
        if self.statement_timeout_s > 0:
            return self.statement_timeout_s + STALL_MARGIN_S
        return None

    def with_url(self, url: str) -> DatabaseSettings:
        return self.model_copy(update={"database_url": SecretStr(url)})

    def require_url(self) -> str:
        if self.database_url is None:
            raise MissingDatabaseUrl
        return self.database_url.get_secret_value()


class MissingDatabaseUrl(RuntimeError):
    def __init__(self) -> None:
        super().__init__(
            "DATABASE_URL is not set (use `make run` to start everything on the "
            "embedded PostgreSQL, or set DATABASE_URL=postgresql://user@host:port/db)"
        )


class ServiceSettings(DatabaseSettings):
    """Settings every gRPC service process reads at start."""

    grpc_port: int | None = Field(default=None, ge=0, le=65535, alias="GRPC_PORT")
    grpc_host: str = Field(default="[::]", alias="GRPC_HOST")
    log_level: str = Field(default="INFO", alias="LOG_LEVEL")
    # Level of the one-line-per-RPC log: a line has the level of its outcome (OK and
    # client-cancelled INFO, other failures WARNING, INTERNAL/UNKNOWN/DATA_LOSS ERROR),
    # so WARNING keeps only failed calls (interceptors.rpc_log_level).
    rpc_log_level: str = Field(default="INFO", alias="RPC_LOG_LEVEL")
    # `text` (default): key=value lines for a terminal; `json`: one object per line
    # (fields in services/common/logs.py).
    log_format: Literal["text", "json"] = Field(default="text", alias="LOG_FORMAT")
    # Comma-separated bearer tokens of the services allowed to call; unset = open.
    auth_tokens: SecretStr | None = Field(default=None, alias="AUTH_TOKENS")
    # Seconds in-flight RPCs get to finish after SIGTERM before they are cancelled.
    shutdown_grace_s: float = Field(default=10.0, ge=0, alias="SHUTDOWN_GRACE_PERIOD")
    # Processes serving this service on its one port (SO_REUSEPORT): 1 = this
    # process serves; more = a supervisor starts that many workers (workers.py).
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS, alias="WORKERS")
    # Largest request a server accepts (bytes); larger ones get RESOURCE_EXHAUSTED.
    max_receive_message_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, alias="GRPC_MAX_RECEIVE_MESSAGE_BYTES"
    )

    # Health follows the database: SELECT 1 every interval; NOT_SERVING after
    # `threshold` consecutive failures, SERVING again on the first success.
    health_check_interval_s: float = Field(default=5.0, gt=0, alias="HEALTH_CHECK_INTERVAL")
    health_check_timeout_s: float = Field(default=2.0, gt=0, alias="HEALTH_CHECK_TIMEOUT")
    health_failure_threshold: int = Field(default=3, ge=1, alias="HEALTH_FAILURE_THRESHOLD")

    @field_validator("log_level", "rpc_log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    # TLS: serve TLS with this certificate and key; with a client CA, require and
    # verify client certificates (mTLS between internal services).
    tls_cert_file: str | None = Field(default=None, alias="TLS_CERT_FILE")
    tls_key_file: str | None = Field(default=None, alias="TLS_KEY_FILE")
    tls_client_ca_file: str | None = Field(default=None, alias="TLS_CLIENT_CA_FILE")

    @model_validator(mode="after")
    def _tls_pairs(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
        return self

    # Prometheus /metrics port; unset = the service's default, 0 = off.
    metrics_port: int | None = Field(default=None, ge=0, le=65535, alias="METRICS_PORT")
    # Interface of /metrics; unset = the one gRPC binds (GRPC_HOST), so a service
    # bound to loopback does not expose its metrics on every interface.
    metrics_host: str | None = Field(default=None, alias="METRICS_HOST")

    def metrics_bind_host(self) -> str:
        """The address for the HTTP server: brackets of an IPv6 literal removed."""
        host = self.metrics_host if self.metrics_host is not None else self.grpc_host
        return host.removeprefix("[").removesuffix("]")

    @model_validator(mode="after")
    def _worker_metrics_ports_exist(self) -> ServiceSettings:
        if self.metrics_port and self.metrics_port_for("", self.workers) > 65535:
            raise ValueError(
                f"METRICS_PORT + {WORKER_METRICS_STRIDE} x (WORKERS - 1) must be at most 65535"
            )
        return self

    def metrics_port_for(self, service: str, worker: int = 1) -> int:
        """The /metrics port of `worker` (1-based) of `service`; 0 = off."""
        if self.metrics_port is not None:
            base = self.metrics_port
        else:
            base = DEFAULT_METRICS_PORTS[service]
        return base + WORKER_METRICS_STRIDE * (worker - 1) if base else 0

    def port_for(self, service: str) -> int:
        return self.grpc_port if self.grpc_port is not None else DEFAULT_PORTS[service]

    def token_list(self) -> list[str]:
        if self.auth_tokens is None:
            return []
        raw = self.auth_tokens.get_secret_value()
        return [token.strip() for token in raw.split(",") if token.strip()]
