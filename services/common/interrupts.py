"""Ending a running RPC from outside it, with a status instead of a bare CANCELLED.

A server stream can be stuck in a write for as long as its client does not read
(flow control), so an error queued for it would only be seen when the client
reads again, and the call would hold its resources until then. `interrupt()`
cancels the RPC's task and remembers why; the interceptor, catching the
cancellation inside that task, asks `take()` and, if the cancellation was ours
alone (the client did not cancel as well), ends the call with that error.
"""

from __future__ import annotations

import asyncio
import weakref

from services.common.errors import DomainError

_WHY: weakref.WeakKeyDictionary[asyncio.Task[object], DomainError] = weakref.WeakKeyDictionary()


def interrupt(task: asyncio.Task[object], error: DomainError) -> None:
    """End the RPC running in `task` with `error` (once; later calls change nothing)."""
    if task.done() or task in _WHY:
        return
    _WHY[task] = error
    task.cancel()


def take(task: asyncio.Task[object] | None) -> DomainError | None:
    """The error `task` was interrupted with, if only `interrupt()` cancelled it.

    Also undoes that cancellation, so the caller may go on to abort the call.
    """
    if task is None:
        return None
    error = _WHY.pop(task, None)
    if error is None or task.cancelling() != 1:
        return None  # not ours, or the client cancelled too: stay cancelled
    task.uncancel()
    return error
