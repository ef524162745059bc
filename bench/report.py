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


def summarize(latencies: list[float], duration: float) -> tuple[float, float, float]:
    if not latencies:
        return 0.0, float("nan"), float("nan")
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return len(ordered) / duration, statistics.median(ordered) * 1000, p99 * 1000


def table(figures: list[Figure]) -> str:
    head = "| path | setting | throughput/s | p50 ms | p99 ms | ceiling | ratio |"
    lines = [head, "|---|---|---:|---:|---:|---|---:|"]
    for f in figures:
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}"
        lines.append(
            f"| {f.path} | {f.setting} | {f.throughput:,.0f} | {f.p50_ms:.2f} | "
            f"{f.p99_ms:.2f} | {f.ceiling} | {ratio} |"
        )
    return "\n".join(lines)


def write(results: Path, stamp: str, meta: dict[str, Any], figures: list[Figure]) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta, "figures": [asdict(f) for f in figures]}
    path = results / f"bench-{stamp}.json"
    path.write_text(json.dumps(body, indent=2))
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
