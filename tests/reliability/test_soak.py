"""The soak in its short form (about 20 s of traffic); `make soak` runs it long."""

from __future__ import annotations

import dataclasses
import json

from tests.reliability.soak import run_soak, start_system


async def test_mixed_traffic_soak_holds_every_check(database_url: str) -> None:
    async with start_system(database_url) as addresses:
        report = await run_soak(addresses, database_url, duration_s=20, streams=20, writers=4)
    details = json.dumps(dataclasses.asdict(report), indent=2)
    assert report.errors == 0, details
    assert report.messages_sent > 0, details
    assert report.streams_missing == 0 and report.streams_duplicates == 0, details
    assert report.failures == [], details
    assert all(report.checks.values()), details
