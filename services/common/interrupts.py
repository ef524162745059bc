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
# Tasks whose interruption was taken: they are ending the call with its status. The
# entry in _WHY stays, so a second interrupt() (two reasons to end one stream can
# arrive together) cannot cancel the abort that is sending that status, which
# would leave a second status to send: gRPC core refuses it
# (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS) and the client never hears the end.
_TAKEN: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()


def interrupt(task: asyncio.Task[object], error: DomainError) -> None:
    """End the RPC running in `task` with `error` (once; later calls change nothing)."""
    if task.done() or task in _WHY:
        return
    _WHY[task] = error
    task.cancel()


def take(task: asyncio.Task[object] | None) -> DomainError | None:
    """The error `task` was interrupted with, if only `interrupt()` cancelled it.

    Also undoes that cancellation, so the caller may go on to abort the call.
    Returns an error at most once per task.
    """
    if task is None or task in _TAKEN:
        return None
    error = _WHY.get(task)
    if error is None or task.cancelling() != 1:
        return None  # not ours, or the client cancelled too: stay cancelled
    _TAKEN.add(task)
    task.uncancel()
    return error
