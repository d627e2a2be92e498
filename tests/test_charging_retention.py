"""Issue 15: the charging log (IF-4, ``GET /v1/charging``) is bounded — events past their
maximum age, and the oldest beyond the maximum count, are deleted by the webhook dispatcher's
passes (``WebhookConfig.charging_max_age`` / ``charging_max_events``, ``dmengine serve
--charging-max-age / --charging-max-events``).  Real LMDB store, the real dispatcher."""
from __future__ import annotations

import asyncio
import pathlib

import pytest

from dmengine.cli import _webhook_config, build_parser
from dmengine.errors import ConfigError
from dmengine.model import OutboxEntry
from dmengine.store.lmdb import LmdbStore
from dmengine.webhooks import WebhookConfig, Webhooks
from conftest import Clock

DAY = 86400.0


async def _charge(store: LmdbStore, i: int, when: float) -> None:
    await store.enqueue(OutboxEntry(entry_id=f"ch{i:03d}", kind="charging", topic="charging",
                                    due=when, payload={"time": when, "task_id": f"t{i}",
                                                       "operation": "UPDATE",
                                                       "result": "SUCCEEDED"}))


async def _log(store: LmdbStore) -> list[str]:
    return [e.event_id for e in (await store.charging_events(limit=1000)).items]


def test_the_dispatcher_prunes_the_charging_log_by_age_and_count(tmp_path: pathlib.Path):
    async def main() -> None:
        store = LmdbStore(tmp_path / "env", map_size=1 << 24)
        clock = Clock(1_000 * DAY)
        hooks = Webhooks(store, config=WebhookConfig(charging_max_age=30 * DAY,
                                                     charging_max_events=50,
                                                     retention_interval=3600.0), clock=clock)
        try:
            for i in range(40):                   # 40 … 1 days old: 10 are past 30 days
                await _charge(store, i, clock.now - (40 - i) * DAY)
            await hooks.pass_once()
            # 40 … 31 days old go; one exactly 30 days old is not past the age yet
            assert await _log(store) == [f"ch{i:03d}" for i in range(10, 40)]
            assert hooks.pruned == 10
            for i in range(40, 100):            # 60 new ones, all recent
                await _charge(store, i, clock.now - 0.5 * DAY + i)
            await hooks.pass_once()             # within the interval: nothing runs yet
            assert len(await _log(store)) == 90
            clock.now += 3600.0
            await hooks.pass_once()
            assert await _log(store) == [f"ch{i:03d}" for i in range(50, 100)]
            assert hooks.pruned == 50
            assert await store.check() == []
        finally:
            await store.close()
    asyncio.run(main())


def test_no_bounds_keeps_everything(tmp_path: pathlib.Path):
    async def main() -> None:
        store = LmdbStore(tmp_path / "env", map_size=1 << 24)
        hooks = Webhooks(store, config=WebhookConfig(charging_max_age=None,
                                                     charging_max_events=None))
        try:
            for i in range(5):
                await _charge(store, i, 1000.0 + i)   # 1970: ancient
            assert await hooks.prune_charging() == 0
            assert len(await _log(store)) == 5
        finally:
            await store.close()
    asyncio.run(main())


def test_serve_options_set_the_retention_and_refuse_nonsense():
    cfg = _webhook_config(build_parser().parse_args(
        ["serve", "--charging-max-age", "86400", "--charging-max-events", "1000000"]))
    assert (cfg.charging_max_age, cfg.charging_max_events) == (86400.0, 1_000_000)
    cfg = _webhook_config(build_parser().parse_args(
        ["serve", "--charging-max-age", "0", "--charging-max-events", "0"]))
    assert (cfg.charging_max_age, cfg.charging_max_events) == (None, None)
    assert _webhook_config(build_parser().parse_args(["serve"])) == WebhookConfig()
    with pytest.raises(ConfigError) as ei:
        _webhook_config(build_parser().parse_args(["serve", "--charging-max-events", "-1"]))
    assert ei.value.key == "--charging-max-events"
    with pytest.raises(ConfigError) as ei:
        WebhookConfig(charging_max_age=-5.0)
    assert ei.value.key == "webhooks.charging_max_age"
