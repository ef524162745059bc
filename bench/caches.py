"""Cache hit rates over a figure's window: the hook for caches the services will have.

No service has a cache yet (issue 18 plans some), so nothing is reported today.
When one lands, it exports two Prometheus counters labelled by cache,
`chat_cache_hits_total{cache="..."}` and `chat_cache_misses_total{cache="..."}`,
and `python -m bench --metrics` starts the services with a /metrics port: the
bench then reads both before and after each figure's window and reports each
cache's hit rate over it (Figure.cache_hit_rates). Without --metrics, or with
no such counters, a figure's cache_hit_rates stays None (not measured) or {}.
"""

from __future__ import annotations

import re
import urllib.request

HITS = "chat_cache_hits_total"
MISSES = "chat_cache_misses_total"
_SAMPLE = re.compile(
    r'^(?P<name>chat_cache_(?:hits|misses)_total)\{[^}]*cache="(?P<cache>[^"]*)"[^}]*\}\s+'
    r"(?P<value>[0-9.eE+-]+)"
)

Counts = dict[str, tuple[float, float]]  # cache -> (hits, misses)


def read_counts(metrics_url: str | None) -> Counts | None:
    """Every cache's hits and misses so far (summed over label sets), or None."""
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    counts: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            pair = counts.setdefault(match["cache"], [0.0, 0.0])
            pair[0 if match["name"] == HITS else 1] += float(match["value"])
    return {cache: (hits, misses) for cache, (hits, misses) in counts.items()}


def hit_rates(before: list[Counts | None], after: list[Counts | None]) -> dict[str, float] | None:
    """Hit rate per cache over the window, summed over processes; None if unmeasured."""
    if not after or any(c is None for c in (*before, *after)):
        return None
    totals: dict[str, list[float]] = {}
    for b, a in zip(before, after, strict=True):
        assert a is not None and b is not None
        for cache, (hits, misses) in a.items():
            hits0, misses0 = b.get(cache, (0.0, 0.0))
            pair = totals.setdefault(cache, [0.0, 0.0])
            pair[0] += hits - hits0
            pair[1] += misses - misses0
    return {
        cache: hits / (hits + misses) for cache, (hits, misses) in totals.items() if hits + misses
    }
