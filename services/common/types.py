"""Type aliases shared by servicers, stores and interceptors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import grpc

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A database connection as stores receive it: a plain connection or one
    # acquired from the pool (asyncpg wraps those in a proxy with the same API).
    DbConnection: TypeAlias = asyncpg.Connection | PoolConnectionProxy[Any]
else:
    DbConnection: TypeAlias = Any  # the proxy is generic only in the type stubs

# The context every async servicer method gets (request/response types vary).
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
