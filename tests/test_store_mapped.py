"""The server's mapped store pages stay bounded (issue 16: at a million devices the pages of
the store the server had touched made its RSS 2.2 GB): past ``max_mapped`` resident bytes
the writer remaps the map; the data stays whole and readable, and the store keeps working."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from dmengine.engine import EngineConfig
from dmengine.errors import ConfigError
from dmengine.model import Device
from dmengine.store.lmdb import LmdbStore, _rss_file


def _devices(n: int, start: int = 0) -> list[Device]:
    # a few KB of DevInfo each: the store's pages add up fast
    return [Device(dev_id=f"IMEI:{350000000000000 + i}",
                   devinfo={"./DevInfo/Mod": "x" * 2000, "./DevInfo/Man": f"m{i}"})
            for i in range(start, start + n)]


def test_mapped_pages_are_dropped_past_the_limit_and_the_data_stays(tmp_path) -> None:
    async def main() -> None:
        store = LmdbStore(tmp_path / "s", max_mapped=16 << 20, read_cache_size=0)
        try:
            base = store._rss_file_base
            await store.import_devices(_devices(20_000))      # ~50 MB of pages
            # read every record: the pages are mapped in this process now
            for i in range(0, 20_000, 7):
                await store.get_device(f"IMEI:{350000000000000 + i}")
            before = _rss_file() - base
            assert before > 16 << 20, before
            assert store._trim_mapped() is True
            assert _rss_file() - base < before / 2
            assert store.map_trims == 1 and store.info()["map_trims"] == 1
            # every record still there and the store still writes
            for i in range(0, 20_000, 997):
                d = await store.get_device(f"IMEI:{350000000000000 + i}")
                assert d.devinfo["./DevInfo/Man"] == f"m{i}"
            await store.import_devices(_devices(100, start=20_000))
            assert (await store.get_device("IMEI:350000000020099")).dev_id.endswith("20099")
            assert store._trim_mapped() is False     # under the limit again
        finally:
            await store.close()
    asyncio.run(main())


def test_the_limit_off_never_trims(tmp_path) -> None:
    async def main() -> None:
        store = LmdbStore(tmp_path / "s", max_mapped=None)
        try:
            await store.import_devices(_devices(5_000))
            assert store._trim_mapped() is False and store.map_trims == 0
        finally:
            await store.close()
    asyncio.run(main())


def test_a_limit_too_small_is_refused_naming_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match="max_mapped"):
        LmdbStore(tmp_path / "s", max_mapped=1 << 20)
    with pytest.raises(ConfigError) as e:
        EngineConfig(data_dir=str(tmp_path), store_max_mapped=1 << 20)
    assert e.value.key == "store_max_mapped"


def test_serve_refuses_a_too_small_limit_naming_the_option(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "dmengine", "serve", "--data", str(tmp_path / "v"),
                        "--device-port", "0", "--api-port", "0", "--store-max-mapped-mb", "4"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode != 0
    assert "--store-max-mapped-mb" in r.stderr
