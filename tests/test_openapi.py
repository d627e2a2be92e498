"""Issue 15: the OpenAPI 3.1 document (GET /openapi.json) and the docs page (GET /docs).

* every route of the app is in the document, its ``operationId`` the route's name (the seeds'
  operation names, DESIGN.md §3), and every seed operation is there;
* the document and the docs page (with its assets) are readable without a key, and the page
  refers only to the app's own URLs: it works offline (and renders in headless Chromium with
  every other host unreachable, when Chromium is installed);
* schemathesis, driven by the live app's own document: every operation, generated requests
  (bounded: a few examples each) plus explicit ones on records that exist, no 500, every
  answer's status, media type and body as the document says.
"""
from __future__ import annotations

import asyncio
import hashlib
import html.parser
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import uvloop

from dmengine.engine import Engine, EngineConfig

KEY = "k-openapi-tests-0123456789"
IMEI = "356938035643809"
DEV_ID = f"IMEI:{IMEI}"

#: every operation DESIGN.md §3 names (the seeds' names)
SEED_OPERATIONS = {
    "login", "logout", "doOperation", "doBootstrap", "doBulkOperation", "getTaskById",
    "createDeployments", "cancelJob", "pauseJob", "restartJob", "cancelTask", "getJobs",
    "getJobsByDate", "getTasks", "getTaskHistory", "createDeviceInstance",
    "updateDeviceInstance", "deleteDeviceInstance", "getDeviceInstanceByDeviceID",
    "importDeviceInstances", "createDeviceCapability", "updateDeviceCapability",
    "getDeviceCapabilityByOid", "uploadContent", "getContent", "listContent", "deleteContent",
    "getDiagnostics", "createSubscription", "deleteSubscription", "getSubscriptions",
}


# --- a live engine in a thread of its own ---------------------------------------------------


class Live:
    """The real engine (LMDB store in a tmp dir, both ports on loopback) served from a thread
    with its own event loop, so that blocking clients (urllib, requests, Chromium) can call it."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.engine: Engine | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-engine", daemon=True)

    def _run(self) -> None:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        self.engine = Engine(EngineConfig(data_dir=self.data_dir, device_port=0, api_port=0,
                                          api_key=KEY))
        try:
            loop.run_until_complete(self.engine.start())
        except BaseException as exc:       # reported by start()
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.engine.stop())
            loop.close()

    def start(self) -> "Live":
        self._thread.start()
        assert self._ready.wait(60), "the engine did not start"
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(60)

    @property
    def url(self) -> str:
        assert self.engine is not None
        return self.engine.api_url

    def run(self, coro: Any, timeout: float = 30) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def call(url: str, method: str = "GET", body: Any = None, key: str | None = KEY,
         data: bytes | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    h = dict(headers or {})
    if key:
        h["X-API-Key"] = key
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    lv = Live(str(tmp_path_factory.mktemp("openapi") / "var")).start()
    try:
        yield lv
    finally:
        lv.stop()


@pytest.fixture(scope="module")
def seeded(live: Live) -> dict[str, str]:
    """Records the explicit cases read: a capability, a device, a package, a QUERY and a
    DIAG task (no gateway: they wait for the device), a job."""
    u = live.url
    s, _, b = call(u + "v1/capabilities", "POST", {
        "oid": "cap-ex100", "make": "Acme", "model": "EX100", "firmwareVersions": ["2.3.9"],
        "tacs": [IMEI[:8]], "moPaths": {"fumo": "./FUMO/1"}})
    assert s == 201, b
    s, _, b = call(u + "v1/devices", "POST", {
        "devId": DEV_ID, "imei": IMEI, "msisdn": "+491701234567", "capability": "cap-ex100",
        "account": {"serverId": "dmengine", "clientName": "dev0", "clientPassword": "pw"}})
    assert s == 201, b
    fw = b"firmware " * 100
    s, _, b = call(u + f"v1/content?name=fw.bin&capability=cap-ex100&from=2.3.9&to=2.4.0"
                   f"&sha256={hashlib.sha256(fw).hexdigest()}", "POST", data=fw,
                   headers={"Content-Type": "application/octet-stream"})
    assert s == 201, b
    content_id = json.loads(b)["contentId"]
    s, _, b = call(u + "v1/operations", "POST", {
        "target": {"devId": DEV_ID}, "operation": {"operation": "QUERY",
                                                   "nodes": ["./DevInfo/Mod"]}})
    assert s == 201, b
    task_id = json.loads(b)["taskId"]
    s, _, b = call(u + "v1/operations", "POST", {
        "target": {"imei": IMEI}, "operation": {"operation": "DIAG"}, "testCycle": True})
    assert s == 201, b
    diag_id = json.loads(b)["taskId"]
    s, _, b = call(u + "v1/jobs", "POST", {
        "operation": {"operation": "UPDATE", "contentId": content_id},
        "selection": {"capability": "cap-ex100"}, "name": "seeded"})
    assert s == 201, b
    job_id = json.loads(b)["jobId"]
    return {"taskId": task_id, "diagTaskId": diag_id, "jobId": job_id, "contentId": content_id,
            "devId": DEV_ID, "oid": "cap-ex100"}


def document(live: Live) -> dict[str, Any]:
    status, headers, body = call(live.url + "openapi.json", key=None)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    return json.loads(body)


# --- the document ----------------------------------------------------------------------------------


def test_every_route_is_in_the_document_with_its_operation_id(live):
    doc = document(live)
    assert doc["openapi"].startswith("3.1")
    assert live.engine is not None
    app = live.engine.api_runner.app
    ops: dict[tuple[str, str], str] = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            ops[(method.upper(), path)] = op["operationId"]
    from dmengine.wsi.app import _unrouted
    # (the catch-all of the paths no route has is not an operation: 401, then 404 / 405)
    routes = [r for r in app.router.routes()
              if r.method != "HEAD" and r.handler.__wrapped__ is not _unrouted]
    assert routes
    for r in routes:
        info = r.resource.get_info()
        path = info.get("path") or info.get("formatter")
        assert r.name, f"{r.method} {path} has no name (= operationId)"
        assert ops.get((r.method, path)) == r.name, (r.method, path, r.name)
    assert len(ops) == len(routes)                     # nothing in the document but routes
    ids = list(ops.values())
    assert len(ids) == len(set(ids)), "operationIds are unique"
    missing = SEED_OPERATIONS - set(ids)
    assert not missing, f"seed operations without a route: {sorted(missing)}"
    # every operation documents the one error shape; the public ones need no key
    schemas = doc["components"]["schemas"]
    assert set(schemas["ErrorBody"]["required"]) == {"error", "message", "where"}
    for (method, path), op_id in ops.items():
        op = doc["paths"][path][method.lower()]
        assert op["responses"]["default"]["content"]["application/json"]["schema"] == \
            {"$ref": "#/components/schemas/ErrorBody"}, op_id
        if path in ("/health", "/metrics", "/openapi.json", "/docs", "/docs/{asset}"):
            assert op["security"] == [], op_id
    # bodies are camelCase: no property of any schema has an underscore (a few fields are
    # documented by others' modules: only ours are checked, by the seeds' names)
    for name, s in schemas.items():
        for prop in s.get("properties", {}):
            assert "_" not in prop, f"{name}.{prop} is not camelCase"
    do_op = doc["paths"]["/v1/operations"]["post"]
    ref = do_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = schemas[ref.rsplit("/", 1)[1]]
    assert {"target", "operation", "bOptin", "acceptDevicePolicy", "testCycle"} <= \
        set(body["properties"])


def test_readme_lists_every_operation(live):
    """The README's API table names every operationId of the document."""
    import pathlib
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    doc = document(live)
    ids = {op["operationId"] for item in doc["paths"].values() for op in item.values()}
    missing = sorted(i for i in ids if f"`{i}`" not in readme)
    assert not missing, f"README.md does not list {missing}"
    assert "/openapi.json" in readme and "/docs" in readme


def test_openapi_and_docs_need_no_key_and_the_page_is_self_contained(live):
    u = live.url
    assert call(u + "openapi.json", key=None)[0] == 200
    assert call(u + "v1/tasks/nope", key=None)[0] == 401          # the operations do
    status, headers, body = call(u + "docs", key=None)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers.get("Content-Security-Policy", "")

    class Refs(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.refs: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            for name, value in attrs:
                if name in ("src", "href") and value:
                    self.refs.append(value)
    p = Refs()
    p.feed(body.decode())
    assert len(p.refs) >= 3, p.refs
    for ref in p.refs:
        # the app's own URLs only: absolute paths, no scheme, no other host
        assert ref.startswith("/") and not ref.startswith("//"), ref
        status, headers, data = call(u + ref.lstrip("/"), key=None)
        assert status == 200 and data, ref
    init = call(u + "docs/init.js", key=None)[2].decode()
    assert '"/openapi.json"' in init and "validatorUrl: null" in init
    assert call(u + "docs/nope.js", key=None)[0] == 404
    assert call(u + "docs/..%2Fopenapi.json", key=None)[0] == 404


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_docs_page_renders_offline_in_headless_chromium(live, tmp_path):
    """Swagger UI renders the document with every host but the app's unreachable: the
    operations and their operationIds are on the page, and a screenshot is taken."""
    chromium = _chromium()
    assert chromium is not None, "no Chromium: `make deps` installs it (Makefile DEB_PARTS)"
    url = live.url + "docs"
    common = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
              "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
              "--disable-background-networking", "--disable-component-update",
              "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000"]
    env = {**os.environ, "HOME": str(tmp_path)}
    r = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                       timeout=180, env=env)
    dom = r.stdout
    assert "swagger-ui" in dom, r.stderr[-2000:]
    for op_id in ("doOperation", "getTaskById", "createDeployments", "getDiagnostics"):
        assert op_id in dom, (op_id, r.stderr[-2000:])
    assert "/v1/tasks/{taskId}" in dom
    shot = tmp_path / "docs.png"
    r = subprocess.run([*common, "--window-size=1280,2000", f"--screenshot={shot}", url],
                       capture_output=True, text=True, timeout=180, env=env)
    assert shot.exists() and shot.stat().st_size > 20_000, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- schemathesis against the live app ----------------------------------------------------------

#: generated examples per operation (bounded: the whole run stays well under two minutes)
MAX_EXAMPLES = int(os.environ.get("DMENGINE_SCHEMATHESIS_EXAMPLES", "12"))


def _register_media_types() -> None:
    import schemathesis
    from hypothesis import strategies as st
    rows = st.lists(st.from_regex(r"[0-9]{15}", fullmatch=True), max_size=3).map(
        lambda imeis: ("imei,msisdn\n" + "".join(f"{i},\n" for i in imeis)).encode())
    schemathesis.openapi.media_type("text/csv", rows)
    nd = st.lists(st.from_regex(r"[0-9]{15}", fullmatch=True), max_size=3).map(
        lambda imeis: "".join(json.dumps({"devId": f"IMEI:{i}", "imei": i}) + "\n"
                              for i in imeis).encode())
    schemathesis.openapi.media_type("application/x-ndjson", nd)


def _explicit(seeded: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """operationId → requests on records that exist (so that 200 answers are checked)."""
    t, j, c, d, o = (seeded[k] for k in ("taskId", "jobId", "contentId", "devId", "oid"))
    return {
        "getTaskById": [{"path_parameters": {"taskId": t}},
                        {"path_parameters": {"taskId": seeded["diagTaskId"]}}],
        "getTaskHistory": [{"path_parameters": {"taskId": t}, "query": {"limit": 1}}],
        "getJob": [{"path_parameters": {"jobId": j}}],
        "getTasks": [{"path_parameters": {"jobId": j}, "query": {"limit": 5}}],
        "getJobs": [{"query": {}}, {"query": {"state": "RUNNING", "limit": 1}}],
        "getJobsByDate": [{"query": {"from": "0"}}],
        "getDeviceInstanceByDeviceID": [{"path_parameters": {"devId": d}},
                                        {"path_parameters": {"devId": IMEI}}],
        "getDeviceInstances": [{"query": {}}, {"query": {"imei": IMEI}},
                               {"query": {"capability": o, "limit": 1}}],
        "updateDeviceInstance": [{"path_parameters": {"devId": d}, "body": {"tz": "UTC"}}],
        "getDeviceCapabilityByOid": [{"path_parameters": {"oid": o}}],
        "getDeviceCapabilities": [{"query": {}}],
        "updateDeviceCapability": [{"path_parameters": {"oid": o},
                                    "body": {"make": "Acme Corp"}}],
        "getContent": [{"path_parameters": {"contentId": c}}],
        "listContent": [{"query": {}}, {"query": {"capability": o}}],
        "getDiagnostics": [{"query": {"devId": d}}, {"query": {"taskId": seeded["diagTaskId"]}}],
        "health": [{}],
        "getOpenApi": [{}],
    }


def test_schemathesis_every_operation_no_500_and_answers_match(live, seeded):
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance,
                                                   response_schema_conformance,
                                                   status_code_conformance)
    _register_media_types()
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_url(live.url + "openapi.json")
    base = live.url.rstrip("/")
    headers = {"X-API-Key": KEY}
    explicit = _explicit(seeded)
    failures: list[str] = []
    seen: list[str] = []
    # the destructive operations last, so that the explicit reads find their records
    last = {"deleteDeviceInstance", "deleteDeviceCapability", "deleteContent", "cancelJob",
            "cancelTask", "logout", "revokeApiKey", "deleteUser", "deleteSubscription"}
    operations = sorted((r.ok() for r in schema.get_all_operations()),
                        key=lambda op: (op.definition.raw.get("operationId") in last,
                                        op.definition.raw.get("operationId", "")))
    t0 = time.monotonic()
    for op in operations:
        op_id = op.definition.raw.get("operationId", op.label)
        if op_id in ("logout",):
            continue              # would end the caller's session (a key has none: 4xx)
        seen.append(op_id)
        for kw in explicit.get(op_id, []):
            case = op.Case(**kw)
            try:
                case.call_and_validate(base_url=base, headers=headers, checks=checks)
            except Exception as exc:           # noqa: BLE001 - every failure is listed
                failures.append(f"{op_id} (explicit {kw}): {exc}"[:3000])

        @given(case=op.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=True,
                  verbosity=hypothesis.Verbosity.quiet)
        def run(case: Any) -> None:
            case.call_and_validate(base_url=base, headers=headers, checks=checks)
        try:
            run()
        except Exception as exc:               # noqa: BLE001
            failures.append(f"{op_id}: {exc}"[:3000])
    elapsed = time.monotonic() - t0
    assert not failures, "\n\n".join(failures)
    assert len(seen) >= len(SEED_OPERATIONS) - 1
    assert elapsed < 150, f"the run took {elapsed:.0f} s"
