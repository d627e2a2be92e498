"""Issue 15: the identity cache (dmengine/identity.py) spares the store read of a call's key —
and never outlives a change: a revoked key, a removed user, an ended userSession or a changed
role counts on the very next request, whether the change came through the API or from another
process on the same store (``dmengine keys revoke``, a store write).  Real ``serve`` over HTTP,
real LMDB."""
from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from dmengine.identity import Identities, IdentityConfig
from dmengine.store.lmdb import LmdbStore

from test_cli_serve import start, stop


def call(url: str, key: str | None, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


def test_revokes_and_role_changes_count_on_the_very_next_request(tmp_path: pathlib.Path):
    data = str(tmp_path / "var")
    p, urls = start(data)
    api, admin = urls["API"], urls["API key"]
    try:
        keys = {}
        for name in ("crm", "oss", "ops"):
            status, made = call(api + "v1/keys", admin, "POST", {"name": name, "role": "operator"})
            assert status == 201, made
            keys[name] = (made["keyId"], made["apiKey"])
        jobs = api + "v1/jobs"
        for _, secret in keys.values():           # each key read once, then cached
            for _ in range(3):
                assert call(jobs, secret)[0] == 200

        # revoked through the API: the very next request is refused
        kid, secret = keys["crm"]
        assert call(api + f"v1/keys/{kid}", admin, "DELETE")[0] == 200
        status, err = call(jobs, secret)
        assert status == 401 and err["error"] == "unauthorized", err

        # revoked by another process on the same store (the CLI): the same
        kid, secret = keys["oss"]
        r = subprocess.run([sys.executable, "-m", "dmengine", "keys", "revoke", kid,
                            "--data", data], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert call(jobs, secret)[0] == 401

        # a role changed by a store write of another process: the next call has the new role
        kid, secret = keys["ops"]
        op = {"target": {"devId": "IMEI:356938035643809"},
              "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}}
        assert call(api + "v1/operations", secret, "POST", op)[0] == 404   # allowed: no device
        _store_write(data, lambda s: s.update_api_key(kid, {"role": "viewer"}))
        status, err = call(api + "v1/operations", secret, "POST", op)
        assert status == 403 and "needs the role operator" in err["message"], err
        assert call(jobs, secret)[0] == 200                                # a viewer's read
        _store_write(data, lambda s: s.update_api_key(kid, {"role": "operator"}))
        assert call(api + "v1/operations", secret, "POST", op)[0] == 404

        # a userSession: cached while it lives, refused right after logout
        status, login = call(api + "v1/login", None, "POST", {"apiKey": secret})
        assert status == 200, login
        token = login["userSession"]
        assert call(jobs, token)[0] == 200 and call(jobs, token)[0] == 200
        assert call(api + "v1/logout", token, "POST")[0] in (200, 204)
        assert call(jobs, token)[0] == 401

        # a user removed: its session ends at once
        status, user = call(api + "v1/users", admin, "POST",
                            {"name": "alice", "role": "viewer", "password": "correct horse battery"})
        assert status == 201, user
        status, login = call(api + "v1/login", None, "POST",
                             {"userName": "alice", "password": "correct horse battery"})
        token = login["userSession"]
        assert call(jobs, token)[0] == 200
        assert call(api + "v1/users/alice", admin, "DELETE")[0] in (200, 204)
        assert call(jobs, token)[0] == 401
        # the admin key kept working all along (its entry refreshed after each change)
        assert call(jobs, admin)[0] == 200
    finally:
        stop(p)
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


def _store_write(data: str, fn: Any) -> None:
    """A write on the serve's store from this (another) process, as ``dmengine keys`` does."""
    async def main() -> None:
        store = LmdbStore(pathlib.Path(data) / "store")
        try:
            await fn(store)
        finally:
            await store.close()
    asyncio.run(main())


def test_the_cache_spares_the_key_read_and_holds_no_refused_credential(tmp_path):
    async def main() -> None:
        store = LmdbStore(tmp_path / "env", map_size=1 << 24)
        ids = Identities(store, IdentityConfig(cache_size=2))
        try:
            _, k1 = await ids.create_key("a", "viewer")
            _, k2 = await ids.create_key("b", "viewer")
            _, k3 = await ids.create_key("c", "viewer")
            for _ in range(5):
                assert (await ids.authenticate(k1)).owner == "a"
            assert (ids.cache_misses, ids.cache_hits) == (1, 4)
            for bad in ("dmk_nope", "dms_nope"):
                for _ in range(3):
                    try:
                        await ids.authenticate(bad)
                    except Exception:
                        pass
            assert len(ids._cache) == 1                 # refusals are never kept
            await ids.authenticate(k2)
            await ids.authenticate(k3)                  # bounded: the oldest entry went
            assert len(ids._cache) == 2
            misses = ids.cache_misses
            await ids.authenticate(k1)
            assert ids.cache_misses == misses + 1
        finally:
            await store.close()
    asyncio.run(main())


def test_one_turn_of_the_loop_checks_a_key_once_and_the_next_turn_again(tmp_path):
    """``Identities.known``: the calls of one key in one turn of the event loop cost one
    hash and one read of the identity generation; the next turn reads it again, so a
    change committed in between counts (here: a revoke by another store on the same
    environment, as ``dmengine keys revoke`` makes it)."""
    async def main() -> None:
        store = LmdbStore(tmp_path / "env", map_size=1 << 24)
        ids = Identities(store)
        reads = 0
        real = store.identity_generation

        def counted() -> int:
            nonlocal reads
            reads += 1
            return real()
        store.identity_generation = counted          # type: ignore[method-assign]
        try:
            made, key = await ids.create_key("crm", "operator")
            assert (await ids.authenticate(key)).owner == "crm"     # read once: cached
            reads = 0
            assert all(ids.known(key) is not None for _ in range(5))   # one turn
            assert reads == 1
            await asyncio.sleep(0)                                 # the turn ends
            assert not ids._turn                                   # no secret kept
            assert ids.known(key) is not None and reads == 2
            await asyncio.sleep(0)
            await store.update_api_key(made.key_id, {"revoked": 1.0})      # (the writer's turn)
            assert ids.known(key) is None                          # the next turn sees it
            assert ids.known("dmk_unknown") is None and ids.known("") is None
        finally:
            await store.close()
    asyncio.run(main())


def test_under_load_every_request_sent_after_the_revoke_is_answered_is_refused(tmp_path):
    """Sixteen connections keep calling with one key while an admin revokes it: every call
    sent after the revoke's answer came is refused, whatever turn of the server's loop
    it shares with calls that were already there (the per-turn check of ``known``)."""
    import aiohttp

    data = str(tmp_path / "var")
    p, urls = start(data)
    api, admin = urls["API"], urls["API key"]

    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(api + "v1/keys", json={"name": "oss", "role": "viewer",
                                                           "rate": 0},
                                 headers={"X-API-Key": admin}) as r:
                made = await r.json()
                assert r.status == 201, made
            kid, key = made["keyId"], made["apiKey"]
            loop = asyncio.get_running_loop()
            revoke_sent: list[float] = []          # when the DELETE went out
            revoked_at: list[float] = []           # when its answer came
            early: list[int] = []                  # answered before the DELETE was sent
            late: list[int] = []                   # sent after its answer came
            stop_at = loop.time() + 30

            async def hammer() -> None:
                while loop.time() < stop_at and len(late) < 200:
                    sent = loop.time()
                    async with http.get(api + "v1/jobs", headers={"X-API-Key": key}) as r:
                        await r.read()
                    if not revoke_sent:
                        early.append(r.status)
                    elif revoked_at and sent > revoked_at[0]:
                        late.append(r.status)

            workers = [asyncio.ensure_future(hammer()) for _ in range(16)]
            await asyncio.sleep(0.5)
            revoke_sent.append(loop.time())
            async with http.delete(api + f"v1/keys/{kid}", headers={"X-API-Key": admin}) as r:
                assert r.status == 200
            revoked_at.append(loop.time())
            await asyncio.gather(*workers)
            assert len(early) >= 16 and set(early) == {200}
            assert len(late) >= 200 and set(late) == {401}, late
    try:
        asyncio.run(main())
    finally:
        stop(p)
