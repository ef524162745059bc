"""The benchmark's table, JSON and chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    path: str  # e.g. "SendMessage spread"
    setting: str  # e.g. "32 clients"
    throughput: float  # calls/s (or messages/s)
    p50_ms: float
    p99_ms: float
    ceiling: str = ""  # what it is held against
    ratio: float | None = None  # figure / ceiling (throughput, or latency where noted)
    note: str = ""
    # CPU per call over the measured window (bench.cpu), in microseconds: the
    # service processes', the load generators', PostgreSQL's serving backends'
    # (`db`) and the whole PostgreSQL process tree's (`db_tree`, an upper bound).
    # None where not measured or not applicable (no service, remote server).
    calls: int | None = None  # the calls (or deliveries) the per-call figures divide by
    service_cpu_us: float | None = None
    client_cpu_us: float | None = None
    db_cpu_us: float | None = None
    db_tree_cpu_us: float | None = None
    # The same as multiples of the empty RPC's service CPU per call measured in
    # this run (the median of the CPU rounds' empty RPC at the same clients).
    service_cpu_x_empty: float | None = None
    client_cpu_x_empty: float | None = None
    db_cpu_x_empty: float | None = None
    db_tree_cpu_x_empty: float | None = None
    repeats: int = 1  # > 1: every number is the median of this many interleaved rounds
    # Cache name -> hit rate over the window (bench.caches), once services have
    # caches and the bench runs with --metrics; None: not measured.
    cache_hit_rates: dict[str, float] | None = None

    def scale_to(self, empty_service_us: float | None) -> None:
        """Fill the *_x_empty fields against the empty RPC's service CPU per call."""
        if not empty_service_us:
            return
        for name in ("service", "client", "db", "db_tree"):
            value = getattr(self, f"{name}_cpu_us")
            if value is not None and getattr(self, f"{name}_cpu_x_empty") is None:
                setattr(self, f"{name}_cpu_x_empty", value / empty_service_us)


def median_figure(rounds: list[Figure]) -> Figure:
    """One figure from interleaved rounds of the same path: the median of each number.

    The *_x_empty fields are medians of each round's own ratio (against the empty
    RPC of the same round), not ratios of medians."""
    first = rounds[0]

    def med(name: str) -> Any:
        values = [getattr(f, name) for f in rounds if getattr(f, name) is not None]
        values = [v for v in values if v == v]  # drop NaN
        return statistics.median(values) if values else None

    out = Figure(
        first.path,
        first.setting,
        med("throughput") or 0.0,
        med("p50_ms") if med("p50_ms") is not None else float("nan"),
        med("p99_ms") if med("p99_ms") is not None else float("nan"),
        ceiling=first.ceiling,
        ratio=med("ratio"),
        # Every round's note parts, once each (e.g. each round's workers' CPU shares).
        note="; ".join(dict.fromkeys(x for f in rounds for x in f.note.split("; ") if x)),
        repeats=len(rounds),
    )
    for name in ("calls", "service_cpu_us", "client_cpu_us", "db_cpu_us", "db_tree_cpu_us"):
        setattr(out, name, med(name))
    if out.calls is not None:
        out.calls = round(out.calls)
    for name in ("service", "client", "db", "db_tree"):
        setattr(out, f"{name}_cpu_x_empty", med(f"{name}_cpu_x_empty"))
    rates = [f.cache_hit_rates for f in rounds if f.cache_hit_rates is not None]
    if rates:
        names = {name for r in rates for name in r}
        out.cache_hit_rates = {
            n: statistics.median([r[n] for r in rates if n in r]) for n in sorted(names)
        }
    return out


def summarize(latencies: list[float], duration: float) -> tuple[float, float, float]:
    if not latencies:
        return 0.0, float("nan"), float("nan")
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return len(ordered) / duration, statistics.median(ordered) * 1000, p99 * 1000


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return ""
    return f"{value:,.{digits}f}"


def table(figures: list[Figure]) -> str:
    """The results table; CPU columns in µs per call and as multiples of the
    empty RPC's service CPU per call (PostgreSQL: serving backends / whole tree)."""
    head = (
        "| path | setting | throughput/s | p50 ms | p99 ms | ceiling | ratio "
        "| service CPU µs/call | service x empty | client µs/call "
        "| PG µs/call (backends / tree) | PG x empty (backends / tree) |"
    )
    lines = [head, "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for f in figures:
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}"
        pg = " / ".join(x for x in (_num(f.db_cpu_us), _num(f.db_tree_cpu_us)) if x)
        if f.db_cpu_us is None and f.db_tree_cpu_us is not None:
            pg = f"- / {_num(f.db_tree_cpu_us)}"
        pg_x = ""
        if f.db_cpu_x_empty is not None or f.db_tree_cpu_x_empty is not None:
            pg_x = f"{_num(f.db_cpu_x_empty, 2) or '-'} / {_num(f.db_tree_cpu_x_empty, 2) or '-'}"
        path = f.path + (f" (median of {f.repeats})" if f.repeats > 1 else "")
        lines.append(
            f"| {path} | {f.setting} | {f.throughput:,.0f} | {f.p50_ms:.2f} | "
            f"{f.p99_ms:.2f} | {f.ceiling} | {ratio} | {_num(f.service_cpu_us)} | "
            f"{_num(f.service_cpu_x_empty, 2)} | {_num(f.client_cpu_us)} | {pg} | {pg_x} |"
        )
    return "\n".join(lines)


def write(
    results: Path, stamp: str, meta: dict[str, Any], figures: list[Figure], *, latest: bool = True
) -> Path:
    """bench-<stamp>.json and the latest.* files; a smoke run (`latest=False`)
    writes quick-<stamp>.json only."""
    results.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta, "figures": [asdict(f) for f in figures]}
    path = results / f"{'bench' if latest else 'quick'}-{stamp}.json"
    path.write_text(json.dumps(body, indent=2))
    if latest:
        (results / "latest.json").write_text(json.dumps(body, indent=2))
        (results / "latest.md").write_text(table(figures) + "\n")
    return path


def chart(results: Path, figures: list[Figure]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for page in ("first page", "deep page"):
        rows = [f for f in figures if f.path == f"ListMessages {page}"]
        sizes = [int(f.setting.split()[0].replace(",", "")) for f in rows]
        left.plot(sizes, [f.p50_ms for f in rows], marker="o", label=f"{page} p50")
        left.plot(sizes, [f.p99_ms for f in rows], marker="x", linestyle="--", label=f"{page} p99")
    left.set_xscale("log")
    left.set_xlabel("messages in the thread")
    left.set_ylabel("latency (ms)")
    left.set_title("ListMessages (page of 50)")
    left.legend()
    for target in ("spread", "hot thread"):
        rows = [f for f in figures if f.path == f"SendMessage {target}"]
        clients = [int(f.setting.split()[0]) for f in rows]
        right.plot(clients, [f.p50_ms for f in rows], marker="o", label=f"{target} p50")
        right.plot(
            clients, [f.p99_ms for f in rows], marker="x", linestyle="--", label=f"{target} p99"
        )
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("latency (ms)")
    right.set_title("SendMessage")
    right.legend()
    fig.tight_layout()
    path = results / "latest.png"
    fig.savefig(path, dpi=110)
    return path
