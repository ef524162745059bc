"""Type aliases shared by servicers and interceptors."""

from typing import Any, TypeAlias

import grpc

# The context every async servicer method gets (request/response types vary).
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
