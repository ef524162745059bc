"""Messages as listings serve them, serialised once per version and reused.

A listing (ListMessages, ListReplies, ListUserMessages, SearchMessages) serves
each message in one form: its row converted by convert.message_to_proto, the
cursor at its creation, framed as an element of the response's `messages` field
(paging.element; the four responses share the field number). That form depends
on the row alone, and every change to a message row moves its `change_seq` (an
edit, a delete, an attachment added, its parent forgotten: each is a stream
event at that position, the streams' own invariant, db/functions/positions.sql).
So `(id, change_seq)` names one serialisation for good, and a page of messages
already served is answered from their bytes: no row object, no protobuf built or
serialised again. A new version has a new key; the old one ages out.

A version is also checked against its `updated_at`, which every write moves
forward: should a position ever be reused for other content (a database
restored from a backup, or a failover that lost commits, under running
processes), the stale entry is a miss, not a wrong answer.

Bounded in bytes (MESSAGE_CACHE_BYTES; 0 turns it off): each entry counts its
serialised size plus ENTRY_OVERHEAD for its key and bookkeeping, and the least
recently used entries leave first. One OrderedDict keyed by a single int, not
cachetools.LRUCache: that keeps three dicts and a tuple key per entry, about 710
bytes of overhead each once entries churn, against about 390 here (both measured
with tracemalloc, keys from asyncpg records, 300-byte payloads). Hits and misses
are Prometheus counters that `make bench --metrics` reads (bench/caches.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from uuid import UUID

from prometheus_client import Counter, Gauge

# What an entry costs beyond its payload: the int key, the (updated_at, bytes)
# tuple, the datetime, the bytes object's header, the dict's and the order
# list's share, slack of deleted slots included (tests/messages/
# test_message_cache_attacks.py measures it with tracemalloc under churn).
ENTRY_OVERHEAD = 448  # measured about 390; the rest is margin
NAME = "serialized_messages"

HITS = Counter("chat_cache_hits_total", "Cache lookups answered from the cache", ["cache"])
MISSES = Counter("chat_cache_misses_total", "Cache lookups that had to build the value", ["cache"])
SIZE = Gauge("chat_cache_bytes", "Bytes a cache holds, its entries' overhead included", ["cache"])

# (message id, change_seq, updated_at): one version of a message.
Version = tuple[UUID, int, datetime]


class SerializedMessages:
    """The listing form of message versions, at most `max_bytes` with overhead."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        # id.int << 64 | change_seq (change_seq is a bigint: below 2**63) ->
        # (updated_at, serialised message)
        self._entries: OrderedDict[int, tuple[datetime, bytes]] = OrderedDict()
        self._size = 0
        self._hits = HITS.labels(NAME)
        self._misses = MISSES.labels(NAME)
        self._gauge = SIZE.labels(NAME)

    def serialized(self, versions: list[Version], build: Callable[[int], bytes]) -> list[bytes]:
        """The bytes of each version: cached, or `build(index)` then kept.

        Counted once per call (a page), so the counters cost two increments a page.
        """
        if self._max_bytes <= 0:
            self._misses.inc(len(versions))
            return [build(i) for i in range(len(versions))]
        entries = self._entries
        out: list[bytes] = []
        misses = 0
        for i, (message_id, change_seq, updated_at) in enumerate(versions):
            key = message_id.int << 64 | change_seq
            entry = entries.get(key)
            if entry is not None and entry[0] == updated_at:
                entries.move_to_end(key)
                out.append(entry[1])
                continue
            misses += 1
            payload = build(i)
            self._put(key, updated_at, payload)
            out.append(payload)
        self._hits.inc(len(versions) - misses)
        self._misses.inc(misses)
        self._gauge.set(self._size)
        return out

    def _put(self, key: int, updated_at: datetime, payload: bytes) -> None:
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self._size -= len(old[1]) + ENTRY_OVERHEAD
        cost = len(payload) + ENTRY_OVERHEAD
        if cost > self._max_bytes:  # larger than the whole cache: served, never kept
            return
        entries[key] = (updated_at, payload)
        self._size += cost
        while self._size > self._max_bytes:
            _, (_, evicted) = entries.popitem(last=False)
            self._size -= len(evicted) + ENTRY_OVERHEAD

    @property
    def size(self) -> int:
        """Bytes held now, overhead included (0 when off)."""
        return self._size
