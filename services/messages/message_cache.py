"""Messages as listings serve them, serialised once per version and reused.

A listing (ListMessages, ListReplies, ListUserMessages, SearchMessages) serves
each message in one form: its row converted by convert.message_to_proto, the
cursor at its creation. That form depends on the row alone, and every change to
a message row moves its `change_seq` (an edit, a delete, an attachment added, its
parent forgotten: each is a stream event at that position, the streams' own
invariant, db/functions/positions.sql). So `(id, change_seq)` names one
serialisation for good, and a page of messages already served is answered from
their bytes: no row object, no protobuf built or serialised again. A new version
has a new key; the old one ages out.

Bounded in bytes (MESSAGE_CACHE_BYTES; 0 turns it off): each entry counts its
serialised size plus ENTRY_OVERHEAD for its key and bookkeeping, and the least
recently used entries leave first (cachetools.LRUCache, a maintained LRU that
sizes entries). Hits and misses are Prometheus counters that `make bench
--metrics` reads (bench/caches.py).
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from cachetools import LRUCache
from prometheus_client import Counter, Gauge

# What an entry costs beyond its payload: the LRU's bookkeeping (about 160
# bytes, measured with tracemalloc), the key tuple, its UUID and int, and the
# bytes object's header (about 220 more by sys.getsizeof); rounded up.
ENTRY_OVERHEAD = 400
NAME = "serialized_messages"

HITS = Counter("chat_cache_hits_total", "Cache lookups answered from the cache", ["cache"])
MISSES = Counter("chat_cache_misses_total", "Cache lookups that had to build the value", ["cache"])
SIZE = Gauge("chat_cache_bytes", "Bytes a cache holds, its entries' overhead included", ["cache"])

# (message id, change_seq): one version of a message.
Key = tuple[UUID, int]


def _entry_size(payload: bytes) -> int:
    return len(payload) + ENTRY_OVERHEAD


class SerializedMessages:
    """The listing form of message versions, by (id, change_seq), at most `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self._cache: LRUCache[Key, bytes] | None = (
            LRUCache(maxsize=max_bytes, getsizeof=_entry_size) if max_bytes > 0 else None
        )
        self._hits = HITS.labels(NAME)
        self._misses = MISSES.labels(NAME)
        self._size = SIZE.labels(NAME)

    def serialized(self, keys: list[Key], build: Callable[[int], bytes]) -> list[bytes]:
        """The bytes of each version in `keys`: cached, or `build(index)` then kept.

        Counted once per call (a page), so the counters cost two increments a page.
        """
        cache = self._cache
        if cache is None:
            self._misses.inc(len(keys))
            return [build(i) for i in range(len(keys))]
        out: list[bytes] = []
        misses = 0
        for i, key in enumerate(keys):
            payload = cache.get(key)
            if payload is None:
                misses += 1
                payload = build(i)
                if _entry_size(payload) <= cache.maxsize:
                    cache[key] = payload
            out.append(payload)
        self._hits.inc(len(keys) - misses)
        self._misses.inc(misses)
        self._size.set(cache.currsize)
        return out

    @property
    def size(self) -> int:
        """Bytes held now, overhead included (0 when off)."""
        return 0 if self._cache is None else int(self._cache.currsize)
