"""Issue 14, devices at scale: importDeviceInstances (streamed CSV / NDJSON), updateDeviceInstance,
deleteDeviceInstance, lookups by bare IMEI and by MSISDN, the device query with cursor paging,
`dmengine devices import` and `dmengine simulate --register` — over real HTTP against the real
engine with its LMDB store (in process), or a `dmengine serve` subprocess for the commands.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import uvloop

from dmengine.engine import Engine, EngineConfig
from conftest import api_client, bounded
from test_cli_serve import start, stop

KEY = "k-devices-tests-0123456789"
SECRETS = ("SECRET-client", "SECRET-server", "U0VDUkVULWtleQ==")
HDR = ("dev_id,imei,msisdn,capability,tz,last_contact,server_id,client_name,client_password,"
       "server_password,client_key\n")


# --- harness ---------------------------------------------------------------------------------


class Api:
    """The engine's API over aiohttp: ``call`` returns (status, decoded JSON or None)."""

    def __init__(self, engine: Engine, http: aiohttp.ClientSession) -> None:
        self.engine = engine
        self.http = http
        self.base = engine.api_url
        self.bodies: list[bytes] = []       # every answer, for the secrets check

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"X-API-Key": KEY, **kw.pop("headers", {})}
        async with self.http.request(method, self.base + path.lstrip("/"), headers=headers,
                                     **kw) as r:
            body = await r.read()
            self.bodies.append(body)
            return r.status, (json.loads(body) if body else None)

    async def import_(self, body: Any, *, fmt: str = "csv", **params: Any) -> tuple[int, Any]:
        ctype = "text/csv" if fmt == "csv" else "application/x-ndjson"
        return await self.call("POST", "v1/devices/import", data=body, params=params,
                               headers={"Content-Type": ctype})

    async def all_pages(self, limit: int, **filters: Any) -> tuple[list[dict[str, Any]], int]:
        out: list[dict[str, Any]] = []
        cursor = None
        pages = 0
        while True:
            params = {**filters, "limit": str(limit)}
            if cursor:
                params["cursor"] = cursor
            status, page = await self.call("GET", "v1/devices", params=params)
            assert status == 200, page
            assert len(page["items"]) <= limit
            out += page["items"]
            pages += 1
            cursor = page["nextCursor"]
            if cursor is None:
                return out, pages

    def assert_no_secret(self) -> None:
        for body in self.bodies:
            for s in SECRETS:
                assert s.encode() not in body, body[:300]


@contextlib.asynccontextmanager
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Api]:
    e = Engine(EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0,
                            api_key=KEY))
    await e.start()
    try:
        async with api_client() as http:
            api = Api(e, http)
            yield api
            api.assert_no_secret()
        assert e.store is not None and await e.store.check() == []
    finally:
        await e.stop()


def run(tmp_path: pathlib.Path, scenario: Callable[[Api], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running(tmp_path) as api:
            await scenario(api)
    uvloop.run(bounded(main()))


def imei(i: int) -> str:
    return f"{356938030000000 + i:015d}"


def row(i: int, **kw: Any) -> str:
    v = {"dev_id": f"IMEI:{imei(i)}", "imei": imei(i), "msisdn": f"+49170{i:08d}",
         "capability": "cap-a", "tz": "", "last_contact": "", "server_id": "acme",
         "client_name": f"dev{i}", "client_password": SECRETS[0],
         "server_password": SECRETS[1], "client_key": SECRETS[2]}
    v.update(kw)
    return ",".join(v[c] for c in HDR.strip().split(",")) + "\n"


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    """A body sent chunked (no Content-Length), ``size`` bytes per write."""
    for i in range(0, len(data), size):
        yield data[i:i + size]
        await asyncio.sleep(0)


# --- importDeviceInstances --------------------------------------------------------------------


def test_csv_import_keeps_good_rows_and_names_line_and_column_of_bad_ones(tmp_path):
    lines = [
        HDR,                                                   # 1
        row(1),                                                # 2 good
        row(2, imei="35693803000000X", dev_id=""),             # 3 bad IMEI
        row(3, msisdn="call-me"),                              # 4 bad MSISDN
        "\n",                                                  # 5 blank: skipped, counted
        row(4).replace(",", ",,", 1),                          # 6 one field too many
        row(5, dev_id="", imei=""),                            # 7 neither dev_id nor imei
        row(6, msisdn="+4917000000001"),                       # 8 MSISDN of line 2
        row(7, last_contact="yesterday"),                      # 9 not a time
        row(8, client_name='"dev, the eighth"'),               # 10 good (a quoted comma)
        row(9, dev_id=""),                                     # 11 good: IMEI:<imei>
        row(10, last_contact="2026-01-02T03:04:05Z", tz="Europe/Berlin"),   # 12 good
        row(11, client_password="x" * 600),                    # 13 secret too long
        row(12, capability='"cap-a'),                          # 14 an unclosed quote
        row(13),                                               # 15 good: only 14 is lost
        row(14),                                               # 16 good
        row(1, msisdn="+4917099999999"),                       # 17 dev_id of line 2
    ]

    async def scenario(api: Api) -> None:
        status, rep = await api.import_(("".join(lines)).encode())
        assert status == 200, rep
        got = {(e["line"], e["where"]) for e in rep["errors"]}
        assert got == {(3, "imei"), (4, "msisdn"), (6, None), (7, "dev_id"), (8, "msisdn"),
                       (9, "last_contact"), (13, "client_password"), (14, None),
                       (17, "dev_id")}, rep["errors"]
        assert [e["line"] for e in rep["errors"]] == sorted(e["line"] for e in rep["errors"])
        assert rep["created"] == 6 and rep["replaced"] == 0
        assert rep["rejected"] == 9 and rep["errorsOmitted"] == 0
        assert rep["rows"] == 15          # 16 lines after the header, one of them blank
        store = api.engine.store
        for i in (1, 8, 9, 10, 13, 14):
            d = await store.get_device(f"IMEI:{imei(i)}")
            assert d.account is not None and d.account.client_password == SECRETS[0]
            assert d.account.server_id == "acme" and d.created > 0
        assert (await store.get_device(f"IMEI:{imei(8)}")).account.client_name == \
            "dev, the eighth"
        ten = await store.get_device(f"IMEI:{imei(10)}")
        assert ten.last_contact == 1767323045.0 and ten.tz == "Europe/Berlin"
        assert (await store.counts())["devices"] == 6
    run(tmp_path, scenario)


CAMEL_HDR = ("devId,imei,msisdn,capability,tz,lastContact,serverId,authScheme,clientName,"
             "clientPassword,serverPassword,clientKey,./DevInfo/Mod\n")


def camel_row(i: int, **kw: Any) -> str:
    v = {"devId": f"IMEI:{imei(i)}", "imei": imei(i), "msisdn": f"+49170{i:08d}",
         "capability": "cap-a", "tz": "Europe/Berlin", "lastContact": "2026-01-02T03:04:05Z",
         "serverId": "acme", "authScheme": "hmac", "clientName": f"dev{i}",
         "clientPassword": SECRETS[0], "serverPassword": SECRETS[1], "clientKey": SECRETS[2],
         "./DevInfo/Mod": "EX100"}
    v.update(kw)
    return ",".join(v[c] for c in CAMEL_HDR.strip().split(",")) + "\n"


def test_csv_columns_in_camel_case_and_errors_name_them_as_written(tmp_path):
    """A CSV header in the API's camelCase (the documented spelling) imports every field; its
    row errors name the column as the header wrote it.  snake_case still works (above), and
    the two may be mixed."""
    async def scenario(api: Api) -> None:
        body = CAMEL_HDR + camel_row(1) + camel_row(2, clientName="") + \
            camel_row(3, lastContact="soon") + camel_row(4, devId="", imei="") + camel_row(5)
        status, rep = await api.import_(body.encode())
        assert status == 200, rep
        assert (rep["created"], rep["rejected"]) == (3, 2), rep
        assert {(e["line"], e["where"]) for e in rep["errors"]} == \
            {(4, "lastContact"), (5, "devId")}, rep["errors"]
        d = (await api.engine.store.get_device(f"IMEI:{imei(1)}"))
        assert (d.msisdn, d.capability, d.tz, d.last_contact) == \
            (f"+49170{1:08d}", "cap-a", "Europe/Berlin", 1767323045.0)
        assert d.account is not None and (d.account.server_id, d.account.auth_scheme,
                                          d.account.client_name) == ("acme", "HMAC", "dev1")
        assert d.devinfo == {"./DevInfo/Mod": "EX100"}
        no_name = await api.engine.store.get_device(f"IMEI:{imei(2)}")
        assert no_name.account is not None and not no_name.account.client_name
        # a store refusal (a taken MSISDN) names the camelCase column too
        status, rep = await api.import_((CAMEL_HDR + camel_row(6, msisdn=f"+49170{1:08d}"))
                                        .encode())
        assert [(e["line"], e["where"]) for e in rep["errors"]] == [(2, "msisdn")], rep
        status, rep = await api.import_(("devId,clientName,server_password\n"
                                         "IMEI:7,dev7,pw\n").encode())      # mixed spellings
        assert (status, rep["created"]) == (200, 1), rep
        status, rep = await api.import_(("devId,colour\nIMEI:8,red\n").encode())
        assert status == 400 and rep["where"] == "colour" and "clientPassword" in rep["message"]
    run(tmp_path, scenario)


def test_ndjson_import_names_the_field_path(tmp_path):
    good = {"devId": f"IMEI:{imei(1)}", "imei": imei(1), "msisdn": "+491700000001",
            "account": {"serverId": "acme", "clientName": "d1",
                        "clientPassword": SECRETS[0]},
            "devdetail": {"./DevDetail/FwV": "1.0"}}
    body = "\n".join([
        json.dumps(good),                                                        # 1
        json.dumps({**good, "devId": "IMEI:2", "imei": "12", "msisdn": None}),    # 2
        "{not json",                                                             # 3
        json.dumps({**good, "devId": "IMEI:3", "imei": None, "msisdn": None,
                    "account": {"serverId": "acme", "clientPassword": 7}}),      # 4
        "",                                                                      # 5
        json.dumps({"devId": "IMEI:5", "colour": "red"}),                        # 6 unknown: ok
        json.dumps({"imei": imei(6)}),                                           # 7 no devId
    ]) + "\n"

    async def scenario(api: Api) -> None:
        status, rep = await api.import_(body.encode(), fmt="ndjson")
        assert status == 200, rep
        assert [(e["line"], e["where"]) for e in rep["errors"]] == [
            (2, "imei"), (3, None), (4, "account.clientPassword"), (7, None)]
        assert "devId" in rep["errors"][3]["message"]
        assert rep["created"] == 2 and rep["rejected"] == 4 and rep["rows"] == 6
        d = await api.engine.store.get_device(f"IMEI:{imei(1)}")
        assert d.devdetail == {"./DevDetail/FwV": "1.0"}
        # ?format= overrides the media type
        status, rep = await api.call("POST", "v1/devices/import",
                                     params={"format": "ndjson", "upsert": "true"},
                                     data=json.dumps(good).encode(),
                                     headers={"Content-Type": "application/octet-stream"})
        assert status == 200 and rep["replaced"] == 1
    run(tmp_path, scenario)


def test_upsert_replaces_and_without_it_existing_devices_are_rejected(tmp_path):
    async def scenario(api: Api) -> None:
        first = HDR + "".join(row(i) for i in range(5))
        status, rep = await api.import_(first.encode())
        assert (status, rep["created"]) == (200, 5)
        created = (await api.engine.store.get_device(f"IMEI:{imei(0)}")).created
        again = HDR + "".join(row(i, tz="Asia/Tokyo") for i in range(6))
        status, rep = await api.import_(again.encode())
        assert rep["created"] == 1 and rep["replaced"] == 0 and rep["rejected"] == 5
        assert {(e["line"], e["where"]) for e in rep["errors"]} == \
            {(i + 2, "dev_id") for i in range(5)}
        assert (await api.engine.store.get_device(f"IMEI:{imei(0)}")).tz is None
        status, rep = await api.import_(again.encode(), upsert="true")
        assert rep["created"] == 0 and rep["replaced"] == 6 and rep["rejected"] == 0
        d = await api.engine.store.get_device(f"IMEI:{imei(0)}")
        assert d.tz == "Asia/Tokyo" and d.created == created and d.updated > created
        # a replaced device's MSISDN moves with it; another device's MSISDN is still refused
        moved = HDR + row(0, msisdn="+4930123456") + row(1, msisdn="+4930123456")
        status, rep = await api.import_(moved.encode(), upsert="true")
        assert rep["replaced"] == 1 and [(e["line"], e["where"]) for e in rep["errors"]] == \
            [(3, "msisdn")]
        assert (await api.engine.store.device_by_msisdn("+4930123456")).dev_id == \
            f"IMEI:{imei(0)}"
        status, rep = await api.import_(first.encode(), upsert="maybe")
        assert status == 400 and rep["where"] == "upsert"
    run(tmp_path, scenario)


def test_chunked_upload_of_thousands_of_rows_and_the_error_cap(tmp_path):
    n = 12_000
    bad = {i for i in range(n) if i % 8 == 3}                 # 1,500 bad rows

    def line(i: int) -> str:
        return row(i, msisdn="nope") if i in bad else row(i)
    data = (HDR + "".join(line(i) for i in range(n))).encode()

    async def scenario(api: Api) -> None:
        # odd-sized pieces: rows cut anywhere, also inside a UTF-8 character of nothing
        status, rep = await api.import_(pieces(data, 7_777))
        assert status == 200, rep
        assert rep["rows"] == n and rep["created"] == n - len(bad)
        assert rep["rejected"] == len(bad)
        assert len(rep["errors"]) == 1000 and rep["errorsOmitted"] == len(bad) - 1000
        # the first 1,000 bad rows by line, in order; a line is the row's index + 2
        assert [e["line"] for e in rep["errors"]] == sorted(i + 2 for i in bad)[:1000]
        assert {e["where"] for e in rep["errors"]} == {"msisdn"}
        assert (await api.engine.store.counts())["devices"] == n - len(bad)
        # the same rows again, NDJSON, in one piece and upserted
        nd = b"".join(json.dumps({"devId": f"IMEI:{imei(i)}", "imei": imei(i),
                                  "msisdn": f"+49170{i:08d}"}).encode() + b"\n"
                      for i in range(n) if i not in bad)
        status, rep = await api.import_(pieces(nd, 65_537), fmt="ndjson", upsert="true")
        assert (status, rep["replaced"], rep["rejected"]) == (200, n - len(bad), 0)
    run(tmp_path, scenario)


def test_a_body_that_cannot_be_imported_is_refused_whole(tmp_path):
    async def scenario(api: Api) -> None:
        cases = [
            ("dev_id,imei,colour\nIMEI:1,1,red\n", "text/csv", {}, "colour"),
            ("imei,imei\n1,1\n", "text/csv", {}, "imei"),
            ("msisdn,tz\n+4917012345,UTC\n", "text/csv", {}, "devId"),
            ("devId,dev_id\nIMEI:1,IMEI:1\n", "text/csv", {}, "dev_id"),    # one field twice
            ("", "text/csv", {}, "header"),
            ("a\n", "application/json", {}, "Content-Type"),
            ("imei\n", "text/csv", {"dryrun": "1"}, "dryrun"),
            ("imei\n", "text/csv", {"format": "xml"}, "format"),
        ]
        for body, ctype, params, where in cases:
            status, rep = await api.call("POST", "v1/devices/import", data=body.encode(),
                                         params=params, headers={"Content-Type": ctype})
            assert status == 400, (body, rep)
            assert set(rep) == {"error", "message", "where"} and rep["where"] == where, rep
        assert (await api.engine.store.counts())["devices"] == 0
        # a line longer than the limit is one rejected row; the rows around it are kept
        from dmengine.devices import MAX_LINE
        body = (HDR + row(1) + "x" * (MAX_LINE + 10) + "\n" + row(2)).encode()
        status, rep = await api.import_(pieces(body, 100_000))
        assert status == 200 and rep["created"] == 2
        assert [(e["line"], e["where"]) for e in rep["errors"]] == [(3, None)]
        # a header longer than the limit, sent in pieces: refused as the header (it was
        # skipped as row 1 and the next line read as the header: "unknown column 'IMEI:1'")
        body = ("devId," + "x" * (2 * MAX_LINE) + "\nIMEI:1\n").encode()
        status, rep = await api.import_(pieces(body, 100_000))
        assert (status, rep["where"]) == (400, "header"), rep
        assert rep["message"] == f"the header row is longer than {MAX_LINE} bytes"
        assert (await api.engine.store.counts())["devices"] == 2
        # bytes that are not UTF-8: that line only
        body = HDR.encode() + row(3).encode() + b"\xff\xfe,bad\n" + row(4).encode()
        status, rep = await api.import_(body)
        assert rep["created"] == 2 and [e["line"] for e in rep["errors"]] == [3]
        # no key, no import
        async with api.http.post(api.base + "v1/devices/import", data=b"imei\n",
                                 headers={"Content-Type": "text/csv"}) as r:
            assert r.status == 401
    run(tmp_path, scenario)


# --- lookups, update, delete --------------------------------------------------------------------


def test_lookup_by_bare_imei_and_msisdn_update_and_delete(tmp_path):
    async def scenario(api: Api) -> None:
        status, rep = await api.import_((HDR + row(1) + row(2)).encode())
        assert rep["created"] == 2
        dev_id = f"IMEI:{imei(1)}"
        for ident in (imei(1), dev_id):
            status, d = await api.call("GET", f"v1/devices/{ident}")
            assert status == 200 and d["devId"] == dev_id
            assert d["account"]["clientPassword"] == "***"
        status, err = await api.call("GET", "v1/devices/356938039999999")
        assert status == 404 and err["error"] == "not_found"
        # by MSISDN: "+" encoded, or sent bare (a query string turns it into a space)
        for q in ("msisdn=%2B49170" + "00000001", "msisdn=+4917000000001"):
            status, page = await api.call("GET", f"v1/devices?{q}")
            assert status == 200 and [d["devId"] for d in page["items"]] == [dev_id]
            assert page["nextCursor"] is None
        status, page = await api.call("GET", "v1/devices", params={"msisdn": "+4900"})
        assert (status, page["items"]) == (200, [])
        status, page = await api.call("GET", "v1/devices", params={"imei": imei(2)})
        assert [d["devId"] for d in page["items"]] == [f"IMEI:{imei(2)}"]
        status, err = await api.call("GET", "v1/devices",
                                     params={"msisdn": "+4917000000001", "tac": "35693803"})
        assert status == 400 and err["where"] == "tac"

        # updateDeviceInstance: a merge-patch, addressed by the bare IMEI too
        status, d = await api.call("PATCH", f"v1/devices/{imei(1)}",
                                   json={"msisdn": "+4930555000", "tz": "Europe/Paris",
                                         "account": {"clientPassword": "SECRET-client-2"}})
        assert status == 200, d
        assert d["msisdn"] == "+4930555000" and d["tz"] == "Europe/Paris"
        assert d["account"]["clientPassword"] == "***" and d["account"]["clientName"] == "dev1"
        rec = await api.engine.store.get_device(dev_id)
        assert rec.account.client_password == "SECRET-client-2"
        assert rec.account.client_key == SECRETS[2]        # the rest of the account stays
        status, page = await api.call("GET", "v1/devices", params={"msisdn": "+4930555000"})
        assert [x["devId"] for x in page["items"]] == [dev_id]
        status, page = await api.call("GET", "v1/devices", params={"msisdn": "+4917000000001"})
        assert page["items"] == []
        status, d = await api.call("PATCH", f"v1/devices/{dev_id}", json={"tz": None})
        assert status == 200 and d["tz"] is None
        refused = [({"devId": "IMEI:9"}, "$.devId"), ({"lastContact": 5.0}, "$.lastContact"),
                   ({"devinfo": {}}, "$.devinfo"), ({"created": 1.0}, "$.created"),
                   ({"colour": "red"}, "$.colour"), ({"msisdn": "x"}, "$.msisdn"),
                   ({"account": "pw"}, "$.account"), ({}, "$"),
                   ({"account": {"clientPasword": "x"}}, "$.account.clientPasword"),
                   ({"dev_id": "IMEI:9"}, "$.dev_id"),           # snake_case: not a field
                   ({"account": {"client_password": "x"}}, "$.account.client_password")]
        for patch, where in refused:
            status, err = await api.call("PATCH", f"v1/devices/{dev_id}", json=patch)
            assert status == 400 and err["where"] == where, (patch, err)
        status, err = await api.call("PATCH", f"v1/devices/{dev_id}", data=b"[1]")
        assert status == 400 and err["where"] == "$"
        status, err = await api.call("PATCH", f"v1/devices/{dev_id}",
                                     json={"msisdn": "+4917000000002"})   # device 2's
        assert status == 409 and err["error"] == "already_exists"
        status, err = await api.call("PATCH", "v1/devices/IMEI:404", json={"tz": "UTC"})
        assert status == 404

        # deleteDeviceInstance
        status, _ = await api.call("DELETE", f"v1/devices/{imei(1)}")
        assert status == 204
        assert (await api.call("GET", f"v1/devices/{dev_id}"))[0] == 404
        assert (await api.call("DELETE", f"v1/devices/{dev_id}"))[0] == 404
        status, page = await api.call("GET", "v1/devices", params={"msisdn": "+4930555000"})
        assert page["items"] == []
        assert [d["devId"] for d in (await api.all_pages(10))[0]] == [f"IMEI:{imei(2)}"]
    run(tmp_path, scenario)


# --- the device query ---------------------------------------------------------------------------


def test_query_filters_and_paging_over_5000_devices(tmp_path):
    n = 5_000
    hdr = "imei,msisdn,capability,last_contact,./DevInfo/Mod,./DevDetail/FwV\n"

    def tac(i: int) -> str:
        return ("35693803", "35000001", "86012345")[i % 3]

    def props(i: int) -> dict[str, Any]:
        return {"imei": f"{tac(i)}{i:07d}", "capability": ("cap-a", "cap-b")[i % 2],
                "model": ("EX100", "EX200", "EX300", "EX400")[i % 4],
                "fw": ("2.3.9", "2.4.0")[(i // 7) % 2],
                "lc": None if i % 10 == 0 else 1_700_000_000.0 + i}
    fleet = [props(i) for i in range(n)]
    body = hdr + "".join(
        f"{p['imei']},+3161{i:07d},{p['capability']},{'' if p['lc'] is None else p['lc']},"
        f"{p['model']},{p['fw']}\n" for i, p in enumerate(fleet))

    async def scenario(api: Api) -> None:
        status, rep = await api.import_(pieces(body.encode(), 50_000))
        assert status == 200 and rep["created"] == n, rep

        def want(pred: Callable[[dict[str, Any]], bool]) -> set[str]:
            return {f"IMEI:{p['imei']}" for p in fleet if pred(p)}
        t0 = 1_700_000_000.0
        cases: list[tuple[dict[str, str], Callable[[dict[str, Any]], bool]]] = [
            ({}, lambda p: True),
            ({"capability": "cap-a"}, lambda p: p["capability"] == "cap-a"),
            ({"tac": "35000001"}, lambda p: p["imei"].startswith("35000001")),
            ({"model": "EX300"}, lambda p: p["model"] == "EX300"),
            ({"firmware": "2.4.0"}, lambda p: p["fw"] == "2.4.0"),
            ({"lastContactAfter": str(t0 + 4000)},
             lambda p: p["lc"] is not None and p["lc"] >= t0 + 4000),
            ({"lastContactBefore": str(t0 + 100)},
             lambda p: p["lc"] is not None and p["lc"] < t0 + 100),
            ({"tac": "86012345", "capability": "cap-b", "model": "EX200", "firmware": "2.3.9",
              "lastContactAfter": "2023-11-14T22:13:20Z"},
             lambda p: p["imei"].startswith("86012345") and p["capability"] == "cap-b" and
             p["model"] == "EX200" and p["fw"] == "2.3.9" and p["lc"] is not None),
            ({"model": "EX999"}, lambda p: False),
        ]
        for filters, pred in cases:
            items, pages = await api.all_pages(333, **filters)
            ids = [d["devId"] for d in items]
            assert len(ids) == len(set(ids)), filters            # every device once …
            assert set(ids) == want(pred), filters               # … and only the matches
            assert pages >= -(-len(ids) // 333)
        items, pages = await api.all_pages(1000)
        assert len(items) == n and pages == 5
        assert all(d.get("account") is None for d in items)
        # the limit and the cursor are checked
        for params, where in (({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"),
                              ({"limit": "10001"}, "limit"), ({"cursor": "%%%"}, "cursor"),
                              ({"tac": "123"}, "tac"), ({"fw": "2.3.9"}, "fw"),
                              ({"lastContactAfter": "soon"}, "lastContactAfter"),
                              ({"last_contact_after": "1"}, "last_contact_after")):
            status, err = await api.call("GET", "v1/devices", params=params)
            assert status == 400 and err["where"] == where, (params, err)
        c = (await api.call("GET", "v1/devices", params={"limit": "1"}))[1]["nextCursor"]
        status, err = await api.call("GET", "v1/devices", params={"cursor": c, "tac": "35693803"})
        assert status == 400 and err["where"] == "cursor"
    run(tmp_path, scenario)


def test_secrets_never_leave_through_any_device_answer(tmp_path):
    async def scenario(api: Api) -> None:
        status, rep = await api.import_((HDR + row(1) + row(2, client_password=SECRETS[0] * 40)
                                         ).encode())
        assert rep["created"] == 1 and rep["rejected"] == 1
        nd = json.dumps({"devId": "IMEI:x", "account": {"serverId": "s",
                                                        "serverPassword": [SECRETS[1]]}})
        status, rep = await api.import_((nd + "\n").encode(), fmt="ndjson")
        assert rep["rejected"] == 1
        status, _ = await api.call("POST", "v1/devices", json={
            "devId": "IMEI:356938035643809", "account": {
                "serverId": "s", "clientPassword": SECRETS[0], "serverKey": SECRETS[2]}})
        assert status == 201
        await api.call("GET", f"v1/devices/{imei(1)}")
        await api.call("GET", "v1/devices", params={"msisdn": "+4917000000001"})
        await api.call("GET", "v1/devices", params={"imei": imei(1)})
        await api.all_pages(1)
        await api.call("PATCH", f"v1/devices/{imei(1)}",
                       json={"account": {"serverPassword": SECRETS[1]}})
        await api.call("PATCH", f"v1/devices/{imei(1)}",
                       json={"account": {"serverPassword": SECRETS[1] * 100}})
        assert sum(SECRETS[0].encode() in b for b in api.bodies) == 0
        # (running() checks every answer of every test for the secrets)
    run(tmp_path, scenario)


# --- the commands, against `dmengine serve` -------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("served")
    p, urls = start(str(root / "var"))
    try:
        yield root, urls
    finally:
        try:
            assert stop(p) == 0
        finally:
            for f in (p.stdout, p.stderr):      # no ResourceWarning when the GC gets them
                if f is not None:
                    f.close()


def dmengine(*args: str, cwd: pathlib.Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != "DMENGINE_API_KEY"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "dmengine", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=e)


def api_of(urls: dict[str, str]) -> str:
    return urls["API"].rstrip("/")


def test_cli_import_exit_codes(served, tmp_path):
    root, urls = served
    api, key = api_of(urls), urls["API key"]
    good = tmp_path / "good.csv"
    good.write_text(HDR + "".join(row(100 + i) for i in range(50)))
    r = dmengine("devices", "import", str(good), "--url", api, f"--api-key={key}")
    assert r.returncode == 0, r.stderr
    assert "created 50, replaced 0, rejected 0" in r.stdout
    camel = tmp_path / "camel.csv"             # the documented camelCase columns
    camel.write_text(CAMEL_HDR + "".join(camel_row(200 + i) for i in range(3)) +
                     camel_row(203, lastContact="never"))
    r = dmengine("devices", "import", str(camel), "--url", api, f"--api-key={key}")
    assert r.returncode == 1 and "created 3" in r.stdout and "line 5 [lastContact]" in r.stdout, \
        r.stdout
    # again: every row exists → 1, the rows named; with --upsert → 0
    r = dmengine("devices", "import", str(good), "--url", api, f"--api-key={key}")
    assert r.returncode == 1 and "rejected 50" in r.stdout and "line 2 [dev_id]" in r.stdout
    assert "and 30 more" in r.stdout
    # the key from the data directory of `dmengine serve` (run where ./var is), JSON report
    r = dmengine("devices", "import", str(good), "--url", api, "--upsert", "--json",
                 cwd=root)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["replaced"] == 50
    nd = tmp_path / "devices.jsonl"
    nd.write_text(json.dumps({"devId": "IMEI:nd1", "msisdn": "bad"}) + "\n" +
                  json.dumps({"devId": "IMEI:nd2"}) + "\n")
    r = dmengine("devices", "import", str(nd), "--url", api, f"--api-key={key}")
    assert r.returncode == 1 and "line 1 [msisdn]" in r.stdout
    # usage errors and an import that did not run: 2
    weird = tmp_path / "devices.xlsx"
    weird.write_text("x")
    for args, needle in (([str(tmp_path / "missing.csv")], "no such file"),
                         ([str(weird)], "--format"),
                         ([str(good), "--api-key=wrong"], "401"),
                         ([str(good), "--format", "tsv"], "invalid choice"),
                         ([str(weird), "--format", "csv"], "unknown column"),
                         ([str(good), "--url", "http://127.0.0.1:9"], "cannot reach")):
        if "--url" not in args:
            args = [*args, "--url", api]
        if not any(a.startswith("--api-key") for a in args):
            args = [*args, f"--api-key={key}"]
        r = dmengine("devices", "import", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
    r = dmengine("devices", "import", str(good), "--url", api, cwd=tmp_path)   # no key at all
    assert r.returncode == 2 and "no API key" in r.stderr


def summary_of(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_simulate_register_lets_the_fleet_authenticate(served, tmp_path):
    root, urls = served
    api, key, dm = api_of(urls), urls["API key"], urls["device port"]
    base = ["simulate", "--url", dm, "--devices", "40", "--concurrency", "8"]
    # --register imports the fleet first (the key read from ./var/api-key), then runs it
    r = dmengine(*base, "--first-index", "5000", "--register", api, "--capability", "cap-sim",
                 cwd=root)
    out = summary_of(r)
    assert out["outcomes"] == {"completed": 40}, out
    assert "registered 40 device(s)" in r.stderr
    # again: the records are replaced (upsert), the sessions still authenticate
    out = summary_of(dmengine(*base, "--first-index", "5000", "--register", api,
                              f"--api-key={key}", "--sessions", "2", "--capability", "cap-sim"))
    assert out["outcomes"] == {"completed": 80}, out
    # --write-import alone writes the file and runs nothing; `devices import` then provisions
    f = tmp_path / "fleet.csv"
    r = dmengine(*base, "--first-index", "7000", "--write-import", str(f))
    assert r.returncode == 0 and r.stdout == "" and f.read_text().count("\n") == 41
    r = dmengine("devices", "import", str(f), "--url", api, f"--api-key={key}")
    assert r.returncode == 0, r.stdout + r.stderr
    out = summary_of(dmengine(*base, "--first-index", "7000"))
    assert out["outcomes"] == {"completed": 40}, out
    # the devices that connected are on record with their last contact and model
    async def check() -> None:
        from dmengine.client import Client
        async with Client(api, key) as c:
            seen = [d async for d in c.iter_devices(capability="cap-sim", model="EX100",
                                                    last_contact_after=1)]
            assert len(seen) == 40
            assert all(d.account is not None and d.account.client_password == "***"
                       for d in seen)
            one = await c.get_device(seen[0].imei)
            assert one.dev_id == seen[0].dev_id
    uvloop.run(check())
    # a refused registration stops before any session runs
    r = dmengine(*base, "--register", api, "--api-key=wrong")
    assert r.returncode == 2 and "401" in r.stderr and r.stdout == ""
    # what a newcomer saw before: nothing provisions the simulated devices (last: the server
    # keeps failed sessions a while and sheds some of them with 503)
    out = summary_of(dmengine(*base, "--first-index", "9000"))
    assert out["outcomes"].get("auth_failed") and \
        set(out["outcomes"]) <= {"auth_failed", "http_503"}, out


def test_cli_devices_get_and_list(served, tmp_path):
    root, urls = served
    api, key = api_of(urls), urls["API key"]
    good = tmp_path / "few.csv"
    good.write_text(HDR + "".join(row(700 + i) for i in range(5)))
    r = dmengine("devices", "import", str(good), "--url", api, f"--api-key={key}", "--upsert")
    assert r.returncode == 0, r.stderr
    r = dmengine("devices", "list", "--url", api, f"--api-key={key}")
    assert r.returncode == 0, r.stderr
    listed = [json.loads(line) for line in r.stdout.splitlines()]
    ids = {d["devId"] for d in listed}
    assert len(ids) == len(listed) and len(ids) >= 5
    one = sorted(ids)[0]
    r = dmengine("devices", "get", one, "--url", api, f"--api-key={key}")
    assert r.returncode == 0 and json.loads(r.stdout)["devId"] == one, r.stderr
    for d in listed:                                   # secrets never leave
        acc = d.get("account") or {}
        for k in ("clientPassword", "serverPassword", "clientKey", "serverKey",
                  "clientNonce", "serverNonce"):
            assert acc.get(k) in (None, "***"), (k, acc)
    r = dmengine("devices", "list", "--max", "2", "--url", api, f"--api-key={key}")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2
    r = dmengine("devices", "get", "IMEI:999999999999999", "--url", api, f"--api-key={key}")
    assert r.returncode == 1 and "404" in r.stderr
    r = dmengine("devices", "get", one, "--url", api, "--api-key=wrong")
    assert r.returncode == 2 and "401" in r.stderr


def test_cli_content_upload(served, tmp_path):
    root, urls = served
    api, key = api_of(urls), urls["API key"]
    pkg = tmp_path / "fw-2.4.0.bin"
    pkg.write_bytes(bytes(range(256)) * 300)
    r = dmengine("content", "upload", str(pkg), "--to", "2.4.0", "--url", api,
                 f"--api-key={key}")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["name"] == "fw-2.4.0.bin" and rec["size"] == 256 * 300 and rec["contentId"]
    import hashlib
    assert rec["sha256"] == hashlib.sha256(pkg.read_bytes()).hexdigest()
    r = dmengine("content", "upload", str(pkg), "--type", "text/plain\r\nX-Bad: 1",
                 "--url", api, f"--api-key={key}")
    assert r.returncode == 1 and "[type]" in r.stderr, r.stderr
    r = dmengine("content", "upload", str(tmp_path / "none.bin"), "--url", api,
                 f"--api-key={key}")
    assert r.returncode == 2 and "no such file" in r.stderr


def test_sync_client(served, tmp_path):
    """The blocking client makes the same calls (from a thread without a loop, or inside one)."""
    from dmengine.client import ClientError, SyncClient
    root, urls = served
    with SyncClient(api_of(urls), urls["API key"]) as c:
        made = c.create_device({"devId": "IMEI:356938035643100", "imei": "356938035643100",
                                "msisdn": "+15550123"})
        assert made.dev_id == "IMEI:356938035643100"
        assert c.get_device("356938035643100").msisdn == "+15550123"   # a bare IMEI
        assert any(d.dev_id == "IMEI:356938035643100" for d in c.iter_devices(limit=50))
        c.delete_device("IMEI:356938035643100")
        try:
            c.get_device("IMEI:356938035643100")
        except ClientError as exc:
            assert exc.status == 404
        else:
            raise AssertionError("a deleted device was found")
