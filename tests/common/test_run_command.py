"""`make run`'s program (`python -m services`) on the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import grpc

from tests.conftest import health_status

REPO = Path(__file__).resolve().parents[2]


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_run_starts_embedded_database_and_three_services(tmp_path: Path) -> None:
    offset = random.randrange(2000, 9000)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["EMBEDDED_PGDATA"] = str(tmp_path / "pg")
    log = tmp_path / "stderr.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services",
        "--port-offset",
        str(offset),
        cwd=REPO,
        env=env,
        # Ctrl-C as a terminal delivers it, even where this test runs with SIGINT
        # ignored (a background job of a non-interactive shell; Python then keeps
        # ignoring it and the stack never stops).
        preexec_fn=_interruptible,
        stdout=asyncio.subprocess.PIPE,
        # The services' logs, for the failure message: a pipe nobody reads could fill.
        stderr=log.open("wb"),
    )
    assert proc.stdout is not None
    output = ""
    try:
        while "Ctrl-C stops everything" not in output:
            line = (await asyncio.wait_for(proc.stdout.readline(), timeout=120)).decode()
            assert line, f"exited before serving: {output}"
            output += line
        assert "applied 0001_initial_schema.sql" in output
        for name, port in [("Users", 50051), ("Threads", 50052), ("Messages", 50053)]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port + offset}") as channel:
                assert await health_status(channel, f"chat.v1.{name}Service") == "SERVING"
            assert f"localhost:{port + offset}" in output
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=60)
        except TimeoutError:
            proc.kill()
            tail = log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"running 60 s after Ctrl-C; its log ends:\n{tail}") from None
    assert code == 0, log.read_text(errors="replace")[-4000:]
    # Everything stopped, the embedded server included; its data stays for next time.
    assert not (tmp_path / "pg" / "postmaster.pid").exists()
    assert (tmp_path / "pg" / "PG_VERSION").exists()
