"""CPU per call: what the service processes, the client processes and PostgreSQL spend.

Everything is read from `/proc/<pid>/stat` (utime + stime, in clock ticks of
1/SC_CLK_TCK s, 10 ms here) at the start and the end of a figure's measured
window, so a figure's CPU is that of the same calls its latencies come from:

- service: the service process and its live descendants (a WORKERS=N service's
  workers), plus the CPU of descendants that exited and were waited for (the
  root's cutime + cstime);
- client: each load-generating process reads its own `os.times()` over the window
  (bench.load) and returns it; the bench adds them up;
- PostgreSQL, two figures:
  * `db`: the serving backends, i.e. the backends of the bench's database whose
    application_name is the service pool's (`chat-<service>`, or the bench's own
    `chat-bench-sql` for the asyncpg ceilings). Processes of the same service
    that are idle during the window (the second messages process, the empty
    server's pool, also named `chat-users`) have idle backends that add nothing
    measurable. A backend that exits inside the window is lost (none do: pools
    are sized and kept), one that starts inside it is counted from zero.
  * `db_tree`: the whole PostgreSQL process tree (postmaster, every backend,
    checkpointer, WAL writer, autovacuum, and the exited children the postmaster
    reaped): an upper bound, which on a shared server (DATABASE_URL pointing at
    a server others use) includes their work too.

Both PostgreSQL figures need the server on this machine: with a remote server
they are None.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import asyncpg
import psutil

TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def stat_cpu(pid: int, *, children: bool = False) -> float | None:
    """utime + stime of `pid` in seconds (plus cutime + cstime with `children`),
    None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state): utime 14, stime 15, cutime 16, cstime 17.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks * TICK


def tree_cpu(pid: int) -> float | None:
    """CPU of `pid`, the children it reaped, and its live descendants (seconds)."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    total = sum(stat_cpu(child.pid) or 0.0 for child in descendants)
    # The root last: a child that exits after being listed and before being read
    # is in the root's cutime by then if reaped (read after it, counted once;
    # read before, counted twice: an upper bound stays one).
    root = stat_cpu(pid, children=True)
    return None if root is None else total + root


@dataclass
class Snapshot:
    at: float  # time.time()
    service_s: float | None
    backends: dict[int, float]  # backend pid -> CPU seconds
    tree_s: float | None


@dataclass
class Target:
    """Whose CPU a figure's calls cost: service processes and their pool's backends."""

    pids: list[int] = field(default_factory=list)  # service root processes
    app_names: list[str] = field(default_factory=list)  # the serving backends' names


@dataclass
class Usage:
    """CPU seconds spent in one window; None where it could not be read."""

    seconds: float
    service_s: float | None
    db_s: float | None
    db_tree_s: float | None
    backends: int  # serving backends seen
    lost: int = 0  # serving backends seen at the start and gone at the end (CPU lost)


class Probe:
    """Reads the service, backend and PostgreSQL tree CPU of a Target."""

    def __init__(self, conn: asyncpg.Connection, postmaster: int | None) -> None:
        self.conn = conn
        self.postmaster = postmaster

    @classmethod
    async def connect(cls, url: str) -> Probe:
        conn = await asyncpg.connect(url, server_settings={"application_name": "chat-bench-probe"})
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        postmaster = None
        try:
            # A backend's parent is the postmaster, when the server runs on this machine.
            process = psutil.Process(backend)
            if "postgres" in process.name() or "postgres" in " ".join(process.cmdline()[:1]):
                postmaster = process.ppid()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        return cls(conn, postmaster)

    async def close(self) -> None:
        await self.conn.close()

    async def snapshot(self, target: Target) -> Snapshot:
        at = time.time()
        service = None
        if target.pids:
            parts = [tree_cpu(pid) for pid in target.pids]
            service = None if any(p is None for p in parts) else sum(p or 0.0 for p in parts)
        backends: dict[int, float] = {}
        if self.postmaster is not None and target.app_names:
            pids = await self.conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = ANY($1::text[])",
                target.app_names,
            )
            for row in pids:
                cpu = stat_cpu(row["pid"])
                if cpu is not None:
                    backends[row["pid"]] = cpu
        tree = tree_cpu(self.postmaster) if self.postmaster is not None else None
        return Snapshot(at, service, backends, tree)

    @staticmethod
    def usage(before: Snapshot, after: Snapshot, target: Target) -> Usage:
        service = None
        if before.service_s is not None and after.service_s is not None:
            service = after.service_s - before.service_s
        db = None
        if target.app_names and (before.backends or after.backends):
            db = sum(cpu - before.backends.get(pid, 0.0) for pid, cpu in after.backends.items())
        tree = None
        if before.tree_s is not None and after.tree_s is not None:
            tree = after.tree_s - before.tree_s
        lost = len(set(before.backends) - set(after.backends))
        return Usage(after.at - before.at, service, db, tree, len(after.backends), lost)


def per_call_us(seconds: float | None, calls: int) -> float | None:
    if seconds is None or calls <= 0:
        return None
    return seconds / calls * 1e6


def rusage_children_s() -> float:
    """CPU of this process's waited-for children (pgbench, run to completion)."""
    t = os.times()
    return t.children_user + t.children_system
