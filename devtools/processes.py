"""Services as separate OS processes (`python -m services.<name>`), for tests and the benchmark.

Each process binds a free port (GRPC_PORT=0) and names it in its start-up log
line; the rest of its log is drained in the background (its last LOG_KEPT lines
are kept for failure messages and log assertions) so a chatty service never
blocks on a full pipe. Services log exactly as deployed (one INFO line per RPC
by default), so a long run produces a lot of lines: only the tail is kept.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from services.common.settings import ServiceSettings
from services.messages.settings import MessagesSettings

REPO = Path(__file__).resolve().parents[1]
# Every variable a service reads its settings from: none is inherited from the
# environment of whoever runs the tests, so a process gets the defaults.
SETTINGS_VARIABLES = frozenset(
    field.alias
    for model in (ServiceSettings, MessagesSettings)
    for field in model.model_fields.values()
    if field.alias
)
_SERVING = re.compile(rb"serving [\w.]+ on port (\d+)")
START_TIMEOUT_S = 60.0
LOG_KEPT = 20_000


@dataclass
class ServiceProcess:
    name: str
    process: asyncio.subprocess.Process
    port: int
    log: list[str] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), timeout=60)
        if self._drain is not None:
            await self._drain
        return code


async def start_service_process(
    name: str, database_url: str, *, module: str | None = None, **env: str
) -> ServiceProcess:
    """Start `python -m services.<name>` (or `module`) on a free port.

    Only where it listens differs from a deployed process: GRPC_PORT=0 (a free
    port) on loopback, and METRICS_PORT=0 (no /metrics endpoint, so parallel
    processes never contend for the default port; pass METRICS_PORT to get one).
    Every other setting is the default (the settings variables of this process's
    environment are not passed on) unless the caller passes it in `env`, and a
    caller does that only for the setting its test is about.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module or f"services.{name}",
        cwd=REPO,
        env={
            **{k: v for k, v in os.environ.items() if k not in SETTINGS_VARIABLES},
            "DATABASE_URL": database_url,
            "GRPC_PORT": "0",
            "GRPC_HOST": "127.0.0.1",
            "METRICS_PORT": "0",
            **env,
        },
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    log: list[str] = []
    port = None
    try:
        while port is None:
            line = await asyncio.wait_for(proc.stderr.readline(), timeout=START_TIMEOUT_S)
            if not line:
                await proc.wait()
                raise RuntimeError(
                    f"{name} exited ({proc.returncode}) before serving:\n{''.join(log)}"
                )
            log.append(line.decode(errors="replace"))
            match = _SERVING.search(line)
            if match:
                port = int(match.group(1))
    except BaseException:
        if proc.returncode is None:  # never leave a half-started service behind
            proc.kill()
            await proc.wait()
        raise
    service = ServiceProcess(name, proc, port, log)

    async def drain() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            log.append(line.decode(errors="replace"))
            if len(log) > LOG_KEPT:
                del log[: len(log) - LOG_KEPT // 2]

    service._drain = asyncio.create_task(drain())
    return service
