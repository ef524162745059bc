"""A client in another language: the Node.js suite in chat_client.test.js.

It runs `node --test` against users, threads and messages started as separate
processes over a fresh database. Its dependencies (@grpc/grpc-js,
@grpc/proto-loader, protobufjs, exact versions) come from the npm registry with
`npm ci` from the committed package-lock.json, only when node_modules is missing
or was installed from another lockfile. Without node and npm on PATH it is skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.rpc import status_pb2

from devtools.processes import REPO, ServiceProcess, start_service_process
from tests.postgres import DatabaseFactory

HERE = Path(__file__).resolve().parent
NODE_MODULES = HERE / "node_modules"
# Written after a successful `npm ci`: the digest of the files it installed from.
INSTALLED_STAMP = NODE_MODULES / ".chat-backend-installed"
MIN_NODE_MAJOR = 20  # node --test with --test-reporter and per-test timeouts
NPM_TIMEOUT_S = 300.0
NODE_TIMEOUT_S = 120.0
SERVICE_LOG_LINES = 60  # of each service, shown when node fails
# Where googleapis-common-protos keeps google/rpc/status.proto and error_details.proto.
GOOGLE_RPC_PROTO_DIR = Path(status_pb2.__file__).resolve().parents[2]


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
        pytest.skip(f"the Node.js client test needs node and npm; {missing} not on PATH")
    return node, npm


async def _run(*command: str, limit_s: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `command` in tests/node; (exit code, stdout and stderr interleaved)."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=HERE,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group, so a timeout stops all of it
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=limit_s)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        pytest.fail(f"{' '.join(command)} did not finish within {limit_s:.0f} s:\n{text}")
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def _lock_digest() -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()


async def _install(node: str, npm: str) -> None:
    code, version = await _run(node, "--version", limit_s=30)
    match = re.match(r"v(\d+)\.", version.strip())
    if code != 0 or match is None or int(match.group(1)) < MIN_NODE_MAJOR:
        pytest.skip(f"the Node.js client test needs node >= {MIN_NODE_MAJOR}; found {version!r}")
    wanted = _lock_digest()
    if INSTALLED_STAMP.is_file() and INSTALLED_STAMP.read_text() == wanted:
        return
    # --ignore-scripts: nothing here needs an install script (protobufjs's postinstall
    # only concerns its CLI), and none runs on the test machine.
    code, out = await _run(
        npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", limit_s=NPM_TIMEOUT_S
    )
    if code != 0:
        pytest.fail(f"npm ci failed in {HERE} (exit {code}):\n{out}")
    INSTALLED_STAMP.write_text(wanted)


@pytest.fixture
async def node() -> str:
    """node, with the locked dependencies installed (skips before any service starts)."""
    node, npm = _tools()
    await _install(node, npm)
    return node


@pytest.fixture
async def services(database_factory: DatabaseFactory) -> AsyncIterator[list[ServiceProcess]]:
    url = await database_factory.create()
    procs: list[ServiceProcess] = []
    try:
        for name in ("users", "threads", "messages"):
            procs.append(await start_service_process(name, url))
        yield procs
    finally:
        for proc in procs:
            await proc.stop()
        await database_factory.drop(url)


async def test_node_client(node: str, services: list[ServiceProcess]) -> None:
    users, threads, messages = services
    env = {
        **os.environ,
        "USERS_ADDR": users.address,
        "THREADS_ADDR": threads.address,
        "MESSAGES_ADDR": messages.address,
        "CHAT_PROTO_DIR": str(REPO / "protos"),
        "GOOGLE_RPC_PROTO_DIR": str(GOOGLE_RPC_PROTO_DIR),
    }
    code, out = await _run(
        node,
        "--test",
        "--test-reporter=spec",
        "chat_client.test.js",
        env=env,
        limit_s=NODE_TIMEOUT_S,
    )
    dead = [proc for proc in services if proc.process.returncode is not None]
    if code != 0:
        pytest.fail(f"node --test failed (exit {code}):\n{out}{_logs(services)}")
    assert not dead, f"a service died while the Node.js client ran:{_logs(dead)}"


def _logs(procs: list[ServiceProcess]) -> str:
    """The end of each service's log (and how it exited, if it did)."""
    parts = []
    for proc in procs:
        code = proc.process.returncode
        state = "running" if code is None else f"exited {code}"
        tail = "".join(proc.log[-SERVICE_LOG_LINES:])
        parts.append(f"\n--- {proc.name} ({state}), last {SERVICE_LOG_LINES} log lines:\n{tail}")
    return "".join(parts)
