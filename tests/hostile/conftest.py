"""The hostile suites' seeded world (the three services: tests/conftest.py `channels`)."""

from __future__ import annotations

import asyncpg
import pytest

from tests.hostile.world import seed_world


@pytest.fixture
async def world(db_pool: asyncpg.Pool) -> list[str]:
    """Ids of a small seeded world (tests/hostile/world.py)."""
    return await seed_world(db_pool)
