"""Issue 15, "who may do what": attacks on the API's authentication and authorization, driven
over real HTTP against a real engine (LMDB store in a tmp dir, device port and API port on
loopback), and ``dmengine keys`` against the same store while the engine runs.

Each test is named after what must hold; SECURITY.md ("Engine and API") lists them.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from conftest import api_client, bounded
from dmengine.engine import Engine, EngineConfig
from dmengine.identity import IdentityConfig
from dmengine.model import Device

KEY = "k-auth-tests-0123456789abcdef"          # the serve key: the first admin key
IMEI = "356938035643809"
DEV_ID = f"IMEI:{IMEI}"
QUERY = {"operation": "QUERY", "nodes": ["./DevInfo/Mod"]}
PASSWORD = "correct horse battery staple 42"
ROOT = pathlib.Path(__file__).resolve().parent.parent


class Api:
    """The engine's API over aiohttp, as anyone holding ``cred`` (a key or a token)."""

    def __init__(self, e: Engine, http: aiohttp.ClientSession) -> None:
        self.e = e
        self.url = e.api_url
        self.http = http

    async def call(self, method: str, path: str, cred: str | None = KEY, *, json: Any = None,
                   params: dict[str, Any] | None = None, header: str = "Authorization"
                   ) -> tuple[int, Any, Any]:
        headers = {}
        if cred is not None:
            headers[header] = f"Bearer {cred}" if header == "Authorization" else cred
        async with self.http.request(method, self.url + path, json=json, params=params,
                                     headers=headers) as r:
            text = await r.text()
            return r.status, (json_loads(text) if text else None), r.headers

    async def key(self, name: str, role: str, **kw: Any) -> tuple[str, str]:
        """A new key (by the admin) → (key_id, key)."""
        status, body, _ = await self.call("POST", "v1/keys", json={"name": name, "role": role,
                                                                   **kw})
        assert status == 201, body
        return body["keyId"], body["apiKey"]

    async def login(self, **body: Any) -> str:
        status, ans, _ = await self.call("POST", "v1/login", None, json=body)
        assert status == 200, ans
        return str(ans["userSession"])

    async def job(self, cred: str, **extra: Any) -> str:
        status, body, _ = await self.call("POST", "v1/jobs", cred, json={
            "operation": QUERY, "selection": {"devIds": [DEV_ID]}, **extra})
        assert status == 201, body
        return str(body["jobId"])

    async def task(self, cred: str) -> str:
        status, body, _ = await self.call("POST", "v1/operations", cred, json={
            "target": {"imei": IMEI}, "operation": QUERY})
        assert status == 201, body
        return str(body["taskId"])

    async def audit(self) -> list[dict[str, Any]]:
        status, page, _ = await self.call("GET", "v1/audit", params={"limit": 10000})
        assert status == 200, page
        return list(page["items"])


def json_loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@contextlib.asynccontextmanager
async def running(tmp_path: pathlib.Path, **cfg: Any) -> AsyncIterator[Api]:
    cfg.setdefault("api_key", KEY)
    e = Engine(EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0, **cfg))
    await e.start()
    try:
        assert e.store is not None
        await e.store.put_device(Device(dev_id=DEV_ID, imei=IMEI, msisdn="+491701234567"))
        async with api_client() as http:
            yield Api(e, http)
    finally:
        await e.stop()


def run(coro: Any) -> Any:
    return asyncio.run(bounded(coro))


def store_bytes(tmp_path: pathlib.Path) -> bytes:
    return (tmp_path / "var" / "store" / "data.mdb").read_bytes()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dmengine", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=str(ROOT))


# --- roles -------------------------------------------------------------------------------------


def test_a_viewer_reads_but_cannot_create_a_job_or_cancel_a_task(tmp_path):
    """A viewer key may read its system's tasks; creating a job, running an operation or
    cancelling a task is 403 naming the role needed (operator), and nothing happens.  Keys
    and the audit log are the admin's alone."""
    async def main() -> None:
        async with running(tmp_path) as api:
            _, op = await api.key("crm", "operator")
            _, viewer = await api.key("crm", "viewer")
            task_id = await api.task(op)
            for method, path, body in (
                    ("POST", "v1/jobs", {"operation": QUERY,
                                         "selection": {"devIds": [DEV_ID]}}),
                    ("POST", "v1/operations", {"target": {"imei": IMEI}, "operation": QUERY}),
                    ("POST", f"v1/tasks/{task_id}/cancel", None)):
                status, err, _ = await api.call(method, path, viewer, json=body)
                assert status == 403, (path, err)
                assert err["error"] == "forbidden" and err["where"] == "role"
                assert "operator" in err["message"] and "viewer" in err["message"], err
            status, task, _ = await api.call("GET", f"v1/tasks/{task_id}", viewer)
            assert status == 200 and task["status"] != "CANCELLED", task
            status, page, _ = await api.call("GET", "v1/jobs", viewer)
            assert status == 200 and page["items"] == []          # no job was made
            for cred in (viewer, op):
                for method, path in (("GET", "v1/keys"), ("POST", "v1/keys"),
                                     ("GET", "v1/audit"), ("POST", "v1/users")):
                    status, err, _ = await api.call(method, path, cred,
                                                    json={"name": "x", "role": "admin"})
                    assert status == 403 and "admin" in err["message"], (path, err)
    run(main())


def test_every_route_has_a_role_or_is_public(tmp_path):
    """The route → role table covers the whole app: a route added without a row would need
    admin (fail closed), and this test names it so that its role is chosen, not defaulted."""
    from dmengine.wsi.app import _unrouted, make_app
    from dmengine.wsi.security import PUBLIC_NAMES, PUBLIC_PATHS, ROLE_OF

    async def main() -> None:
        async with running(tmp_path) as api:
            app = make_app(api.e)
            missing = []
            for r in app.router.routes():
                if r.handler.__wrapped__ is _unrouted:
                    continue                # the paths no route has: 401, then 404 / 405
                info = r.resource.get_info() if r.resource is not None else {}
                path = info.get("path") or info.get("formatter") or ""
                if r.name in PUBLIC_NAMES or path in PUBLIC_PATHS or path.startswith("/docs/"):
                    continue
                if r.name not in ROLE_OF:
                    missing.append(f"{r.method} {path} ({r.name})")
            assert not missing, f"add these routes to security.ROLE_OF: {missing}"
            # and a stranger gets nothing but 401, whatever the path
            for path in ("v1/jobs", "v1/keys", "v1/no-such-route", "v1/tasks/x/history"):
                status, err, headers = await api.call("GET", path, None)
                assert status == 401 and err["error"] == "unauthorized", (path, err)
                assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    run(main())


# --- ownership ------------------------------------------------------------------------------


def test_a_system_cannot_see_or_control_another_systems_jobs_and_tasks(tmp_path):
    """An operator of system B asking for A's job or task gets the 404 of an id that does not
    exist — the same answer, so ids do not leak — on every route about it; B's listings leave
    A's jobs out; nothing of A's changes.  The admin sees everything.  Jobs and tasks record
    the system that asked; B cannot create a job in A's name."""
    async def main() -> None:
        async with running(tmp_path) as api:
            _, crm = await api.key("crm", "operator")
            _, oss = await api.key("oss", "operator")
            job_id = await api.job(crm)
            task_id = await api.task(crm)
            ghost_job, ghost_task = "j0000000000000000000000000000", "t0000000000000000000000000"
            routes = [("GET", "v1/jobs/{j}"), ("POST", "v1/jobs/{j}/pause"),
                      ("POST", "v1/jobs/{j}/restart"), ("POST", "v1/jobs/{j}/cancel"),
                      ("GET", "v1/jobs/{j}/tasks"), ("GET", "v1/tasks/{t}"),
                      ("GET", "v1/tasks/{t}/history"), ("POST", "v1/tasks/{t}/cancel"),
                      ("GET", "v1/diagnostics?taskId={t}")]
            for method, path in routes:
                real = path.format(j=job_id, t=task_id)
                ghost = path.format(j=ghost_job, t=ghost_task)
                status, err, _ = await api.call(method, real, oss)
                g_status, g_err, _ = await api.call(method, ghost, oss)
                assert status == g_status == 404, (real, err, g_err)
                assert json.dumps(err).replace(job_id, "ID").replace(task_id, "ID") == \
                    json.dumps(g_err).replace(ghost_job, "ID").replace(ghost_task, "ID")
            for path, params in (("v1/jobs", {}), ("v1/jobs", {"owner": "crm"}),
                                 ("v1/jobs/by-date", {})):
                status, page, _ = await api.call("GET", path, oss, params=params)
                assert status == 200 and page["items"] == [], (path, page)
            # another system's DIAG results of a device are not B's to read
            status, body, _ = await api.call("POST", "v1/operations", crm, json={
                "target": {"imei": IMEI}, "operation": {"operation": "DIAG",
                                                        "nodes": ["./DevDetail/FwV"]}})
            assert status == 201, body
            for cred, n in ((oss, 0), (crm, 1), (KEY, 1)):
                status, page, _ = await api.call("GET", "v1/diagnostics", cred,
                                                 params={"devId": DEV_ID})
                assert status == 200 and len(page["items"]) == n, (cred, page)
            # A's job and task are untouched, A and the admin see them
            for cred in (crm, KEY):
                status, job, _ = await api.call("GET", f"v1/jobs/{job_id}", cred)
                assert status == 200 and job["state"] == "RUNNING" and job["owner"] == "crm"
                status, task, _ = await api.call("GET", f"v1/tasks/{task_id}", cred)
                assert status == 200 and task["status"] != "CANCELLED"
                status, page, _ = await api.call("GET", "v1/jobs", cred)
                assert [j["jobId"] for j in page["items"]] == [job_id]
            assert api.e.store is not None
            assert (await api.e.store.get_task(task_id)).owner == "crm"
            # B may not create a job in A's name; the admin may (on A's behalf)
            status, err, _ = await api.call("POST", "v1/jobs", oss, json={
                "operation": QUERY, "selection": {"devIds": [DEV_ID]}, "owner": "crm"})
            assert status == 403 and err["where"] == "owner", err
            other = await api.job(KEY, owner="crm")
            status, _, _ = await api.call("GET", f"v1/jobs/{other}", crm)
            assert status == 200
    run(main())


# --- credentials ------------------------------------------------------------------------------


def test_revoked_keys_and_logged_out_or_expired_sessions_are_401(tmp_path):
    """A revoked key (through the API, or ``dmengine keys revoke`` on the store while the
    engine runs) is refused at once, and so are the sessions made with it; a session is
    refused after logout and after it expires."""
    async def main() -> None:
        async with running(tmp_path, identity=IdentityConfig(session_ttl=1.0)) as api:
            kid, k = await api.key("crm", "operator")
            token = await api.login(apiKey=k)
            for cred in (k, token):
                assert (await api.call("GET", "v1/jobs", cred))[0] == 200
            status, info, _ = await api.call("DELETE", f"v1/keys/{kid}")
            assert status == 200 and info["revoked"] is not None and "apiKey" not in info
            for cred in (k, token):
                status, err, headers = await api.call("GET", "v1/jobs", cred)
                assert status == 401 and err["error"] == "unauthorized", err
                assert "WWW-Authenticate" in headers
            status, _, _ = await api.call("POST", "v1/login", None, json={"apiKey": k})
            assert status == 401
            # logout
            _, k2 = await api.key("crm", "viewer")
            t2 = await api.login(apiKey=k2)
            assert (await api.call("POST", "v1/logout", t2))[0] == 204
            assert (await api.call("GET", "v1/jobs", t2))[0] == 401
            assert (await api.call("POST", "v1/logout", t2))[0] == 401
            assert (await api.call("GET", "v1/jobs", k2))[0] == 200      # the key lives on
            # expiry
            t3 = await api.login(apiKey=k2)
            assert (await api.call("GET", "v1/jobs", t3))[0] == 200
            await asyncio.sleep(1.2)
            assert (await api.call("GET", "v1/jobs", t3))[0] == 401
            # the CLI revokes on the store while the engine runs
            kid4, k4 = await api.key("oss", "viewer")
            assert (await api.call("GET", "v1/jobs", k4, header="X-API-Key"))[0] == 200
            done = await asyncio.to_thread(cli, "keys", "revoke", kid4, "--data",
                                           str(tmp_path / "var"))
            assert done.returncode == 0, done.stderr
            assert (await api.call("GET", "v1/jobs", k4, header="X-API-Key"))[0] == 401
            # junk
            for cred in ("dms_" + "A" * 43, "", "x" * 600, "dmk_nope"):
                assert (await api.call("GET", "v1/jobs", cred))[0] == 401
    run(main())


def _scrypt_seconds() -> float:
    cfg = IdentityConfig()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        hashlib.scrypt(b"x" * 16, salt=b"s" * 16, n=cfg.scrypt_n, r=cfg.scrypt_r, p=cfg.scrypt_p,
                       maxmem=64 << 20, dklen=32)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def test_a_wrong_password_is_401_and_costs_scrypt_time_whether_the_user_exists_or_not(tmp_path):
    """Login with a wrong password and login as a user that does not exist answer the same
    401, and both take at least the time of a scrypt check, so timing does not tell which
    names exist.  The password is kept as a scrypt hash, never as itself."""
    async def main() -> None:
        async with running(tmp_path) as api:
            status, user, _ = await api.call("POST", "v1/users", json={
                "name": "alice", "role": "viewer", "password": PASSWORD})
            assert status == 201 and "password" not in user, user

            async def attempt(name: str, password: str) -> tuple[float, Any]:
                t = time.perf_counter()
                status, err, _ = await api.call("POST", "v1/login", None, json={
                    "userName": name, "password": password})
                took = time.perf_counter() - t
                assert status == 401, err
                return took, err

            scrypt = _scrypt_seconds()
            wrong = [await attempt("alice", "not the password at all") for _ in range(3)]
            nobody = [await attempt("nobody-here", "not the password at all")
                      for _ in range(3)]
            assert wrong[0][1] == nobody[0][1]                   # the same answer
            t_wrong = statistics.median(t for t, _ in wrong)
            t_nobody = statistics.median(t for t, _ in nobody)
            assert t_wrong >= 0.5 * scrypt, (t_wrong, scrypt)
            assert t_nobody >= 0.5 * scrypt, (t_nobody, scrypt)
            token = await api.login(userName="alice", password=PASSWORD)
            status, _, _ = await api.call("GET", "v1/jobs", token)
            assert status == 200
            assert api.e.store is not None
            stored = (await api.e.store.get_user("alice")).password_hash
            assert stored.startswith("scrypt$16384$8$1$") and PASSWORD not in stored
        assert PASSWORD.encode() not in store_bytes(tmp_path)
    run(main())


# --- rate limits --------------------------------------------------------------------------------


def test_a_key_over_its_rate_gets_429_with_retry_after_and_others_are_not_affected(tmp_path):
    """A key with rate 0.2/s and burst 3: the 4th quick call is 429 with Retry-After, also
    through a session made with it (one bucket per identity); other keys go on."""
    async def main() -> None:
        async with running(tmp_path) as api:
            _, slow = await api.key("crm", "viewer", rate=0.2, burst=3)
            _, other = await api.key("crm", "viewer")
            token = await api.login(apiKey=slow)         # login itself is not a keyed call
            for _ in range(3):
                assert (await api.call("GET", "v1/jobs", slow))[0] == 200
            for cred in (slow, token):
                status, err, headers = await api.call("GET", "v1/jobs", cred)
                assert status == 429 and err["error"] == "rate_limited", err
                assert int(headers["Retry-After"]) >= 1
            for _ in range(10):
                assert (await api.call("GET", "v1/jobs", other))[0] == 200
                assert (await api.call("GET", "v1/jobs", KEY))[0] == 200
    run(main())


def test_login_attempts_are_limited_per_address(tmp_path):
    """Guessing passwords fast from one address runs into 429 (after a burst of 20, refilled
    at 5/s) before any scrypt work is done for the refused guesses."""
    async def main() -> None:
        async with running(tmp_path) as api:
            answers = await asyncio.gather(*(api.call("POST", "v1/login", None, json={
                "userName": "nobody", "password": f"guess-{i}-guess"}) for i in range(40)))
            statuses = sorted(a[0] for a in answers)
            assert statuses.count(401) <= 25 and statuses.count(429) >= 15, statuses
            assert all(int(a[2]["Retry-After"]) >= 1 for a in answers if a[0] == 429)
    run(main())


# --- audit --------------------------------------------------------------------------------------


def test_the_audit_log_records_who_did_what_with_the_outcome_and_never_a_secret(tmp_path):
    """Every call that changes something is in the audit log — who, what, when, outcome,
    status — refused ones too (403, another system's job); reads are not.  It is paged and
    filtered by actor; no key, password or token is in it or anywhere in the store."""
    async def main() -> None:
        async with running(tmp_path) as api:
            t0 = time.time()
            op_id, op = await api.key("crm", "operator")
            viewer_id, viewer = await api.key("crm", "viewer")
            _, oss = await api.key("oss", "operator")
            assert (await api.call("POST", "v1/users", json={
                "name": "alice", "role": "viewer", "password": PASSWORD}))[0] == 201
            token = await api.login(userName="alice", password=PASSWORD)
            assert (await api.call("POST", "v1/login", None, json={
                "userName": "alice", "password": "wrong-password-xyz"}))[0] == 401
            job_id = await api.job(op)
            assert (await api.call("POST", "v1/jobs", viewer, json={
                "operation": QUERY, "selection": {"devIds": [DEV_ID]}}))[0] == 403
            assert (await api.call("POST", f"v1/jobs/{job_id}/cancel", oss))[0] == 404
            assert (await api.call("POST", f"v1/jobs/{job_id}/cancel", op))[0] == 200
            assert (await api.call("GET", f"v1/jobs/{job_id}", op))[0] == 200
            admin_key = (await api.e.store.api_key_by_hash(  # type: ignore[union-attr]
                hashlib.sha256(KEY.encode()).hexdigest())).key_id

            items = await api.audit()

            def one(actor: str, action: str, outcome: str) -> dict[str, Any]:
                got = [e for e in items if e["actor"] == actor and e["action"] == action
                       and e["outcome"] == outcome]
                assert len(got) == 1, (actor, action, outcome, items)
                assert t0 - 1 <= got[0]["time"] <= time.time() + 1
                return got[0]

            made = [x for x in items if x["action"] == "createApiKey"]
            assert [x["detail"]["made"]["keyId"] for x in made][:2] == [op_id, viewer_id]
            e = made[0]
            assert e["actor"] == f"key:{admin_key}" and e["outcome"] == "ok"
            assert e["status"] == 201 and e["detail"]["role"] == "admin"
            assert e["target"] == "/v1/keys" and e["detail"]["method"] == "POST"
            e = one(f"key:{op_id}", "createDeployments", "ok")
            assert e["detail"]["made"]["jobId"] == job_id and e["detail"]["owner"] == "crm"
            assert one(f"key:{viewer_id}", "createDeployments", "denied")["status"] == 403
            refused = [x for x in items if x["action"] == "cancelJob" and x["status"] == 404]
            assert len(refused) == 1 and refused[0]["target"] == f"/v1/jobs/{job_id}/cancel"
            assert one(f"key:{op_id}", "cancelJob", "ok")["status"] == 200
            assert one("user:alice", "login", "ok")["detail"]["with"] == "password"
            failed = one("anonymous", "login", "denied")
            assert failed["status"] == 401 and failed["detail"]["user"] == "alice"
            assert not [x for x in items if x["action"] in ("getJob", "getJobs")]  # reads
            # paged, and filtered by actor
            seen: list[dict[str, Any]] = []
            cursor = None
            while True:
                params: dict[str, Any] = {"limit": 2}
                if cursor:
                    params["cursor"] = cursor
                status, page, _ = await api.call("GET", "v1/audit", params=params)
                assert status == 200 and len(page["items"]) <= 2
                seen += page["items"]
                cursor = page["nextCursor"]
                if cursor is None:
                    break
            assert seen == items
            status, page, _ = await api.call("GET", "v1/audit",
                                             params={"actor": f"key:{op_id}"})
            assert {x["actor"] for x in page["items"]} == {f"key:{op_id}"}
            assert {x["action"] for x in page["items"]} == {"createDeployments", "cancelJob"}
            text = json.dumps(items)
            for secret in (op, viewer, oss, KEY, PASSWORD, "wrong-password-xyz", token):
                assert secret not in text
        raw = store_bytes(tmp_path)
        for secret in (op, viewer, oss, KEY, PASSWORD, "wrong-password-xyz", token):
            assert secret.encode() not in raw
    run(main())


# --- secrets are shown once, never logged -----------------------------------------------------


def test_keys_and_passwords_are_shown_once_and_never_logged(tmp_path, caplog):
    """A key is in the answer that creates it and in no other (listings, revocation); a
    generated password likewise; the CLI prints a new key once on stdout.  With every logger
    at DEBUG, no key, password or token reaches a log record."""
    caplog.set_level(logging.DEBUG)
    secrets: list[str] = [KEY]

    async def main() -> None:
        async with running(tmp_path) as api:
            kid, k = await api.key("crm", "operator")
            secrets.append(k)
            status, user, _ = await api.call("POST", "v1/users", json={"name": "bob",
                                                                       "role": "viewer"})
            assert status == 201 and len(user["password"]) >= 12
            secrets.append(user["password"])
            token = await api.login(userName="bob", password=user["password"])
            secrets.append(token)
            secrets.append(await api.login(apiKey=k))
            assert (await api.call("GET", "v1/jobs", token))[0] == 200
            await api.task(k)
            assert (await api.call("GET", "v1/nope", "dmk_wrong-key"))[0] == 401
            # the CLI, on the store of the running engine
            made = await asyncio.to_thread(cli, "keys", "create", "--name", "oss", "--role",
                                           "viewer", "--data", str(tmp_path / "var"))
            assert made.returncode == 0, made.stderr
            cli_key = made.stdout.strip()
            secrets.append(cli_key)
            assert cli_key.startswith("dmk_") and cli_key not in made.stderr
            assert (await api.call("GET", "v1/jobs", cli_key))[0] == 200
            listed = await asyncio.to_thread(cli, "keys", "list", "--all", "--json", "--data",
                                             str(tmp_path / "var"))
            assert listed.returncode == 0 and "oss" in listed.stdout
            # no other answer shows a key, a hash or a password
            answers = [
                (await api.call("GET", "v1/keys"))[1],
                (await api.call("GET", "v1/users"))[1],
                (await api.call("DELETE", f"v1/keys/{kid}"))[1],
                (await api.call("GET", "v1/audit"))[1],
            ]
            assert [set(x) for x in answers[0]["items"]] and \
                all("apiKey" not in x and "keyHash" not in x for x in answers[0]["items"])
            assert all("password" not in x and "passwordHash" not in x
                       for x in answers[1]["items"])
            text = json.dumps(answers) + listed.stdout + listed.stderr
            for s in secrets:
                assert s not in text
                assert hashlib.sha256(s.encode()).hexdigest() not in text

    run(main())
    logged = caplog.text + "\n".join(
        f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records)
    assert caplog.records, "nothing was logged at all: the check would be empty"
    for s in secrets:
        assert s not in logged, "a secret reached the log"


# --- backwards compatibility ------------------------------------------------------------------


def test_the_serve_key_is_the_first_admin_key_stored_hashed(tmp_path):
    """``make run``: the key of DATA/api-key (generated once) is an admin key, kept in the
    store as its SHA-256 only; a restart keeps it; configuring another key revokes it (as
    when only the configured key worked)."""
    async def main() -> None:
        async with running(tmp_path, api_key=None) as api:
            key = api.e.api_key
            assert (tmp_path / "var" / "api-key").read_text().strip() == key
            status, page, _ = await api.call("GET", "v1/keys", key)
            assert status == 200
            (only,) = page["items"]
            assert only["role"] == "admin" and only["name"] == "api" and \
                only["createdBy"] == "serve" and only["rate"] == 0
        assert key.encode() not in store_bytes(tmp_path)
        async with running(tmp_path, api_key=None) as api:
            assert api.e.api_key == key
            status, page, _ = await api.call("GET", "v1/keys", key)
            assert status == 200 and len(page["items"]) == 1
        async with running(tmp_path, api_key="another-configured-key-0123") as api:
            assert (await api.call("GET", "v1/keys", key))[0] == 401
            status, page, _ = await api.call("GET", "v1/keys", "another-configured-key-0123")
            assert status == 200
            assert sorted(x["revoked"] is None for x in page["items"]) == [False, True]
    run(main())
