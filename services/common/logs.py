"""Process logging to stderr: `text` (default, for a terminal) or `json` lines.

LOG_FORMAT=text: one line per event, key=value fields.
LOG_FORMAT=json: one JSON object per line (python-json-logger) with `time`
(ISO 8601, UTC), `level`, `service`, `logger`, `message`, and, on the lines
written while a call runs, `request_id` and, when tracing is on, `trace_id` and
`span_id`; the per-RPC line adds `method`, `code`, `duration_ms` and `peer`.
A worker of a service run with WORKERS > 1 adds `worker` (its index, 1..N) to
every line, in both formats, so the interleaved lines of N workers stay apart.

Every call has a request id (the caller's `x-request-id` or a generated one,
interceptors.py): it is in this context variable while the call runs, so every
line logged on the call's behalf carries it, in both formats.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

from services.common import tracing

LogFormat = Literal["text", "json"]

# The request id of the call this task serves (None outside calls).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


class _CallFields(logging.Filter):
    """Adds the call's ids (and the time in UTC) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.time = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        request_id = REQUEST_ID.get()
        if request_id is not None:
            record.request_id = request_id
        ids = tracing.log_ids()
        if ids is not None:
            record.trace_id, record.span_id = ids
        return True


class _Worker(logging.Filter):
    """Adds the worker's index (WORKERS > 1) to every record."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self._worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self._worker
        return True


class _TextFormatter(logging.Formatter):
    """The text line, with the call's ids appended as key=value when it has them."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for key in ("worker", "request_id", "trace_id"):
            value = getattr(record, key, None)
            if value is not None:
                line += f" {key}={value}"
        return line


def _formatter(fmt: LogFormat, service: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(
            "{time}{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"service": service},
        )
    return _TextFormatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")


def configure_logging(
    level: str,
    service: str,
    rpc_level: str = "INFO",
    fmt: LogFormat = "text",
    worker: int | None = None,
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_CallFields())
    if worker is not None:
        handler.addFilter(_Worker(worker))
    handler.setFormatter(_formatter(fmt, service))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # The per-RPC lines (interceptors.py) have their own level.
    logging.getLogger("services.rpc").setLevel(
        max(logging.getLevelName(level), logging.getLevelName(rpc_level))
    )
