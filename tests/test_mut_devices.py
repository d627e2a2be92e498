"""Issue 18, mutmut's survivors in dmengine/devices.py: every acceptDevicePolicy decision with
its cause, device merge-patches, and the streamed import (importDeviceInstances) fed byte by
byte into a real LMDB store, each rejected row compared whole (line, column, message)."""
from __future__ import annotations

import asyncio
import datetime
import gc
import os
import time

import aiohttp
import pytest
from aiohttp import web

from dmengine import devices as D
from dmengine.errors import ValidationError
from dmengine.model import Device
from dmengine.store.lmdb import LmdbStore
from dmengine.urlguard import UrlGuard

from conftest import local_http

REC = "356938035643809"


def decide(policy, record_imei, reported, callback=None):
    record = Device(dev_id=f"IMEI:{record_imei}" if record_imei else "MSISDN:+491", imei=record_imei)
    d = asyncio.run(D.check_device_policy(policy, record, reported, callback=callback))
    return (d.accept, d.cause, d.same_device)


async def _accept(record, reported, task_id):
    return True


async def _reject(record, reported, task_id):
    assert task_id == ""                    # none given: the default is empty
    return False


@pytest.mark.parametrize("policy,record_imei,reported,callback,want", [
    (10, REC, f"IMEI:{REC}", None, (True, "same device", True)),
    (99, REC, f"imei:{REC}", None, (True, "same IMEI", True)),        # another spelling of it
    (10, REC, "IMEI:356938039999999", None,
     (True, "policy 10: IMEI:356938039999999 has the TAC on record", False)),
    (10, REC, "IMEI:356938129999999", None,
     (False, "refused by acceptDevicePolicy 10: IMEI:356938129999999 does not have the TAC of "
             "the IMEI on record", False)),
    (20, None, f"IMEI:{REC}", None, (True, "policy 20: no IMEI on record", False)),
    (20, "490154203237518", f"IMEI:{REC}", None,
     (False, f"refused by acceptDevicePolicy 20: the record has IMEI 490154203237518, device "
             f"reported IMEI:{REC}", False)),
    (30, "490154203237518", f"IMEI:{REC}", None, (True, "policy 30: any IMEI accepted", False)),
    (40, "490154203237518", f"IMEI:{REC}", None,
     (False, "refused by acceptDevicePolicy 40: no carrier callback configured", False)),
    (40, "490154203237518", f"IMEI:{REC}", _accept, (True, "policy 40: the carrier accepted", False)),
    (40, "490154203237518", f"IMEI:{REC}", _reject,
     (False, f"refused by acceptDevicePolicy 40: the carrier rejected IMEI:{REC}", False)),
    (7, "490154203237518", f"IMEI:{REC}", None, (False, "unknown acceptDevicePolicy 7", False)),
    # a record without an IMEI is not "the same IMEI" as a device that has none either
    (20, None, "MSISDN:+491", None, (True, "same device", True)),
    (10, None, "SERIAL:123", None,
     (False, "refused by acceptDevicePolicy 10: SERIAL:123 does not have the TAC of the IMEI "
             "on record", False)),
])
def test_policy_decisions(policy, record_imei, reported, callback, want):
    assert decide(policy, record_imei, reported, callback) == want


def test_imei_helpers():
    assert D.imei_of("IMEI:356938035643809") == "356938035643809"
    assert D.imei_of("imei:12") == "12"
    assert D.imei_of("IMEI:12:34") is None              # the part after the first colon
    assert D.imei_of("MEID:356938035643809") is None
    assert D.imei_of("356938035643809") is None
    assert D.imei_of("") is None and D.imei_of(None) is None
    assert D.is_bare_imei("356938035643809")
    assert not D.is_bare_imei("35693803564380")          # 14 digits
    assert not D.is_bare_imei("3569380356438091")
    assert not D.is_bare_imei("35693803564380X")


def test_device_changes():
    assert D.device_changes({"tz": None, "msisdn": "+49", "account": {"clientName": "x"}}) == \
        {"tz": None, "msisdn": "+49", "account": {"clientName": "x"}}
    assert D.device_changes({"account": None}) == {"account": None}
    for patch, message, where in (
            ({"colour": 1}, "a device has no field 'colour'", "$.colour"),
            ({"dev_id": "x"}, "dev_id cannot be updated (updatable: account, capability, imei, "
                              "msisdn, tz)", "$.dev_id"),
            ({"account": "secret"}, "account must be an object or null", "$.account"),
            ({}, "nothing to update", "$")):
        with pytest.raises(ValidationError) as ei:
            D.device_changes(patch)
        assert (str(ei.value), ei.value.where) == (message, where)


def test_import_format_and_times():
    assert D.import_format("text/csv; charset=utf-8") == "csv"
    assert D.import_format(" Application/X-NDJSON ;x=1;y=2") == "ndjson"
    assert D.import_format("whatever", "csv") == "csv"
    assert D.import_format("whatever", "ndjson") == "ndjson"
    for ctype, explicit, message, where in (
            ("text/csv", "CSV", "format is csv or ndjson, not 'CSV'", "format"),
            ("text/plain; x=text/csv", None,
             "an import is text/csv or application/x-ndjson, not 'text/plain; x=text/csv'",
             "Content-Type")):
        with pytest.raises(ValidationError) as ei:
            D.import_format(ctype, explicit)
        assert (str(ei.value), ei.value.where) == (message, where)
    assert D.parse_time("1700000000.5") == 1700000000.5
    assert D.parse_time("2024-01-02T03:04:05") == \
        datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc).timestamp()
    assert D.parse_time("2024-01-02T03:04:05+02:00") == \
        datetime.datetime(2024, 1, 2, 1, 4, 5, tzinfo=datetime.timezone.utc).timestamp()
    with pytest.raises(ValueError, match="^not a time: 'inf'$"):
        D.parse_time("inf")


def test_csv_header_errors():
    assert D.csv_header(["\ufeffdevId", " imei "]) == (["dev_id", "imei"],
                                                      {"dev_id": "devId", "imei": "imei"})
    for header, message, where in (
            (["devId", "devId"], "column 'devId' appears twice in the header", "devId"),
            (["devId", "dev_id"], "column 'dev_id' names the same field as 'devId' in the header",
             "dev_id"),
            (["msisdn"], "the header names neither devId nor imei", "devId")):
        with pytest.raises(ValidationError) as ei:
            D.csv_row_builder(header, "srv")
        assert (str(ei.value), ei.value.where) == (message, where)


def run_import(tmp_path, body: bytes, fmt="csv", *, pieces=1, read=(), **kw):
    async def main():
        s = LmdbStore(tmp_path / "env")
        try:
            imp = D.DeviceImport(s, fmt, **kw)
            try:
                step = max(1, -(-len(body) // pieces))
                for i in range(0, len(body), step):
                    await imp.feed(body[i:i + step])
                res = await imp.finish()
            finally:
                await imp.close()
            return res, {d: await s.get_device(d) for d in read}
        finally:
            await s.close()
    return asyncio.run(main())


def errors(res):
    return [(e.line, e.where, e.message) for e in res.errors]


def test_csv_import_rows_and_their_errors(tmp_path):
    body = ("\ufeffDevId,imei,clientName,authScheme,lastContact,./DevInfo/Mod,./DevDetail/FwV\r\n"
            "IMEI:356938035643809,356938035643809,dev1,hmac,2024-01-02T03:04:05,EX100,2.3.9\r\n"
            ",490154203237518,dev2,,1700000000,,\n"
            "\n"
            ",,dev3,,,,\n"
            "IMEI:356938035643810,,dev4,,yesterday,,\n"
            "IMEI:356938035643811,,\"dev\"5\",,,,\n"
            "IMEI:356938035643812,,dev6,,,\n"
            "\"IMEI:356938035643813\",,\"dev,7\",basic,,,\n").encode()
    res, got = run_import(tmp_path, body, pieces=7, server_id="srv-x",
                          read=("IMEI:356938035643809", "IMEI:490154203237518",
                                "IMEI:356938035643813"))
    assert errors(res) == [
        (5, "DevId", "devId (or imei) is required"),
        (6, "lastContact", "not a time (epoch seconds or ISO 8601)"),
        (7, None, "not a CSV record: ',' expected after '\"' (a record is one line)"),
        (8, None, "6 fields, the header has 7"),
    ]
    assert (res.rows, res.created, res.replaced, res.rejected, res.errors_omitted) == (7, 3, 0, 4, 0)
    d1 = got["IMEI:356938035643809"]
    assert d1.account.client_name == "dev1" and d1.account.auth_scheme == "HMAC"
    assert d1.account.server_id == "srv-x"              # the import's server id by default
    assert d1.last_contact == datetime.datetime(2024, 1, 2, 3, 4, 5,
                                                tzinfo=datetime.timezone.utc).timestamp()
    assert d1.devinfo == {"./DevInfo/Mod": "EX100"} and d1.devdetail == {"./DevDetail/FwV": "2.3.9"}
    assert d1.created > 0 and d1.updated == d1.created
    d2 = got["IMEI:490154203237518"]                   # devId from the IMEI, empty cells left out
    assert d2.imei == "490154203237518" and d2.last_contact == 1700000000
    assert d2.devinfo == {} and d2.devdetail == {} and d2.account.auth_scheme == "DIGEST"
    assert got["IMEI:356938035643813"].account.client_name == "dev,7"
    assert got["IMEI:356938035643813"].account.auth_scheme == "BASIC"


def test_csv_import_header_problems(tmp_path):
    for body, message, where in (
            (b"", "the CSV has no header row", "header"),
            (b"\n\n", "the CSV has no header row", "header"),
            (b'devId,"imei\n', "bad header row: unexpected end of data", "header")):
        with pytest.raises(ValidationError) as ei:
            run_import(tmp_path, body)
        assert (str(ei.value), ei.value.where) == (message, where)


def test_store_errors_name_the_column_as_the_header_spelled_it(tmp_path):
    body = (b"dev_id,imei,client_name\n"
            b"IMEI:1,notdigits,dev1\n"
            b"IMEI:2,,\n")
    res, _ = run_import(tmp_path, body)
    (line, where, message), = errors(res)
    assert line == 2 and where == "imei" and not message.startswith("Device: ")
    assert res.created == 1


def test_ndjson_import(tmp_path):
    body = (b'{"dev_id": "IMEI:356938035643809", "imei": "356938035643809"}\n'
            b"\n"
            b'{"dev_id": "IMEI:2", "imei": 5}\n'
            b"not json\n"
            b'{"dev_id": "IMEI:356938035643810", "account": {"client_name": 7}}\n'
            b'{"dev_id": "IMEI:356938035643811"}')
    res, got = run_import(tmp_path, body, "ndjson", pieces=3, read=("IMEI:356938035643811",))
    errs = errors(res)
    assert [(ln, w) for ln, w, _ in errs] == [(3, "imei"), (4, None), (5, "account.client_name")]
    assert errs[1][2].startswith("not a JSON object: ")
    assert (res.rows, res.created, res.rejected) == (5, 2, 3)
    dev = got["IMEI:356938035643811"]
    assert dev.created > 0 and dev.updated == dev.created


def test_a_line_longer_than_the_limit_is_one_rejected_row(tmp_path):
    long = b"IMEI:1," + b"9" * (2 * D.MAX_LINE)          # over the limit before its newline
    body = b"devId,imei\n" + long + b"\nIMEI:356938035643809,356938035643809\n"
    res, got = run_import(tmp_path, body, pieces=40, read=("IMEI:356938035643809",))
    assert errors(res) == [(2, None, f"line longer than {D.MAX_LINE} bytes")]
    assert (res.rows, res.created, res.rejected) == (2, 1, 1)
    assert got["IMEI:356938035643809"].imei == "356938035643809"
    body = b'{"dev_id": "' + b"x" * (2 * D.MAX_LINE) + b'"}\n{"dev_id": "IMEI:7"}\n'
    res, _ = run_import(tmp_path / "2", body, "ndjson", pieces=40)
    assert errors(res) == [(1, None, f"line longer than {D.MAX_LINE} bytes")]
    assert (res.rows, res.created) == (2, 1)


def test_a_line_over_the_limit_that_comes_whole_in_one_read_is_rejected_too(tmp_path):
    """The limit holds whatever the reads: a long line whose newline arrives in the same read
    (one piece) is one rejected row, never parsed; a header over it refuses the import."""
    long = b"IMEI:1," + b"9" * (D.MAX_LINE + 10)
    body = b"devId,imei\n" + long + b"\nIMEI:356938035643809,356938035643809\n"
    res, got = run_import(tmp_path, body, pieces=1, read=("IMEI:356938035643809",))
    assert errors(res) == [(2, None, f"line longer than {D.MAX_LINE} bytes")]
    assert (res.rows, res.created, res.rejected) == (2, 1, 1)
    body = b'{"dev_id": "' + b"x" * (D.MAX_LINE + 10) + b'"}\n{"dev_id": "IMEI:7"}\n'
    res, _ = run_import(tmp_path / "2", body, "ndjson", pieces=1)
    assert errors(res) == [(1, None, f"line longer than {D.MAX_LINE} bytes")]
    assert (res.rows, res.created) == (2, 1)
    with pytest.raises(ValidationError, match="header row is longer"):
        run_import(tmp_path / "3", b"devId," + b"x" * (D.MAX_LINE + 10) + b"\nIMEI:1\n",
                   pieces=1)


def test_not_utf8_lines_and_the_error_limit(tmp_path):
    body = b"devId\nIMEI:1\n\xff\xfe\nIMEI:2\n" + b"".join(b",\n" for _ in range(5))
    res, _ = run_import(tmp_path, body, max_errors=3)
    assert errors(res) == [(3, None, "not UTF-8: invalid start byte at byte 0"),
                           (5, None, "2 fields, the header has 1"),
                           (6, None, "2 fields, the header has 1")]
    assert (res.rows, res.created, res.rejected, res.errors_omitted) == (8, 2, 6, 3)


def test_the_first_errors_by_line_are_kept_whatever_order_they_are_found_in(tmp_path):
    """A row the store refuses is reported when its chunk comes back, after later rows' parse
    errors: the errors kept are still the first ones by line, each counted once."""
    body = (b"devId,imei\n"
            b"IMEI:1,notdigits\n"            # 2: refused by the store (imei)
            b"IMEI:2,,x\n"                   # 3: parse error
            b"IMEI:3,,x\n"                   # 4: parse error
            b"IMEI:4,alsobad\n"              # 5: refused by the store
            b"IMEI:5,,x\n")                  # 6: parse error
    res, _ = run_import(tmp_path, body, chunk=1, max_errors=2)
    assert [(e.line, e.where) for e in res.errors] == [(2, "imei"), (3, None)]
    assert (res.rows, res.created, res.rejected, res.errors_omitted) == (5, 0, 5, 3)
    res, _ = run_import(tmp_path / "b", body, chunk=1, max_errors=10)
    assert [e.line for e in res.errors] == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("where,csv,ndjson", [
    (None, None, None), ("$", None, None),
    ("$.imei", "imei", "imei"),
    ("$.account.client_name", "client_name", "account.client_name"),
    ("$.account", "account", "account"),
    ("$.devinfo[./DevInfo/Mod]", "devinfo", "devinfo[./DevInfo/Mod]"),
    ("$.account.client_name[0]", "client_name", "account.client_name[0]"),
    ("$.account.client_name[0][1]", "client_name", "account.client_name[0][1]"),
    ("$.tags[0][1]", "tags", "tags[0][1]"),
    ("imei", "imei", "imei"),
])
def test_where_a_store_error_points(where, csv, ndjson):
    assert D._csv_where(where) == csv
    assert D._json_where(where) == ndjson


# --- the survivors of the 2026-12-06 10:09 run (tests/MUTATION.md, devices.py) ---------------

ID_RULE = "Expected `str` matching regex '^[A-Za-z0-9:._+@/=-]+$' - at `$.dev_id`"
IMEI_RULE = "Expected `str` matching regex '^[0-9]{14,16}$' - at `$.imei`"


def in_store(tmp_path, scenario, **store_kw):
    """``scenario(store)`` against a fresh LMDB store, closed afterwards."""
    async def main():
        s = LmdbStore(tmp_path / "env", **store_kw)
        try:
            return await scenario(s)
        finally:
            await s.close()
    return asyncio.run(main())


async def import_into(store, feeds, fmt="csv", **kw):
    """One import whose body arrives as the reads ``feeds`` (a list of byte strings)."""
    imp = D.DeviceImport(store, fmt, **kw)
    try:
        for piece in feeds:
            await imp.feed(piece)
        return await imp.finish()
    finally:
        await imp.close()


def padded(dev_id: str, size: int) -> bytes:
    """An NDJSON line of exactly ``size`` bytes (JSON whitespace inside the object)."""
    head, tail = b'{"dev_id": "' + dev_id.encode() + b'"', b"}"
    return head + b" " * (size - len(head) - len(tail)) + tail


def test_import_defaults_keep_stored_devices_and_name_the_engine_server(tmp_path):
    """Without ``replace`` a device already stored is refused, not overwritten; an account
    without serverId gets "dmengine"; the store's refusals reach the report whole (without
    the record type's "Device: " prefix, and a message without that prefix untouched)."""
    body = b"devId,imei,clientName\nIMEI:356938035643809,356938035643809,dev1\n"

    async def scenario(s):
        first = await import_into(s, [body])
        again = await import_into(s, [body.replace(b"dev1", b"dev2") + b"IMEI:2,12,x\n"])
        return first, again, await s.get_device("IMEI:356938035643809")
    first, again, dev = in_store(tmp_path, scenario)
    assert (first.rows, first.created, first.replaced, first.rejected) == (1, 1, 0, 0)
    assert errors(again) == [(2, "devId", "device 'IMEI:356938035643809' already exists"),
                             (3, "imei", IMEI_RULE)]
    assert (again.rows, again.created, again.replaced, again.rejected) == (2, 0, 0, 2)
    assert dev.account.client_name == "dev1" and dev.account.server_id == "dmengine"


def test_csv_header_in_any_letter_case_and_the_unknown_column_refusal():
    assert D.csv_header(["DEV_ID", "Client_Name", "IMEI", "./DevInfo/Mod"]) == (
        ["dev_id", "client_name", "imei", "./DevInfo/Mod"],
        {"dev_id": "DEV_ID", "client_name": "Client_Name", "imei": "IMEI",
         "./DevInfo/Mod": "./DevInfo/Mod"})
    with pytest.raises(ValidationError) as ei:
        D.csv_header(["devId", "colour"])
    assert (str(ei.value), ei.value.where) == (
        "unknown column 'colour' (columns: devId, imei, msisdn, capability, tz, lastContact, "
        "serverId, authScheme, clientName, clientPassword, clientKey, clientNonce, "
        "serverPassword, serverKey, serverNonce — or their snake_case names —, ./DevInfo/… "
        "and ./DevDetail/… nodes)", "colour")


def test_a_row_without_devId_is_refused_naming_devId_whatever_the_header_has(tmp_path):
    """A header without imei (only devId) and one without devId (only imei): a row with
    neither is refused as "devId", spelled as the header did or in camelCase."""
    async def scenario(s):
        a = await import_into(s, [b"DEV_ID,msisdn\n,+4917000000001\nIMEI:356938035643809,\n"])
        b = await import_into(s, [b"imei,clientName\n,dev1\n490154203237518,dev2\n"])
        return a, b
    a, b = in_store(tmp_path, scenario)
    assert errors(a) == [(2, "DEV_ID", "devId (or imei) is required")]
    assert errors(b) == [(2, "devId", "devId (or imei) is required")]
    assert (a.rows, a.created, b.rows, b.created) == (2, 1, 2, 1)


def test_a_store_refusal_of_a_node_value_names_the_record_field(tmp_path):
    """The store names a DevInfo node's value as ``$.devinfo[...]`` (not which node): the row
    error says "devinfo", the field, not None."""
    body = b"devId,./DevInfo/Mod\nIMEI:356938035643809," + b"x" * 65537 + b"\n"
    res = in_store(tmp_path, lambda s: import_into(s, [body]))
    assert errors(res) == [(2, "devinfo", "Expected `str` of length <= 65536 - at "
                                          "`$.devinfo[...]`")]


def test_a_time_without_a_zone_is_utc_whatever_the_servers_zone(tmp_path):
    old = os.environ.get("TZ")
    os.environ["TZ"] = "XST+05"                    # a server 5 hours behind UTC
    time.tzset()
    try:
        want = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc).timestamp()
        assert D.parse_time("2024-01-02T03:04:05") == want
        body = b"devId,lastContact\nIMEI:356938035643809,2024-01-02T03:04:05\n"
        dev = in_store(tmp_path, lambda s: _import_and_read(s, body, "IMEI:356938035643809"))
        assert dev.last_contact == want
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


async def _import_and_read(s, body, dev_id):
    await import_into(s, [body])
    return await s.get_device(dev_id)


@pytest.mark.parametrize("feeds,n_rows,n_created,errs", [
    # two lines that are not UTF-8, both rows
    ([b"devId\n\xff\n\xfe\nIMEI:1\n"], 3, 1,
     [(2, None, "not UTF-8: invalid start byte at byte 0"),
      (3, None, "not UTF-8: invalid start byte at byte 0")]),
    # not UTF-8, and a last line without its newline
    ([b"devId\n\xff\nIMEI:1"], 2, 1, [(2, None, "not UTF-8: invalid start byte at byte 0")]),
    # not UTF-8, then a line over the limit that comes whole in the same read
    ([b"devId\n\xff\n" + b"x" * (D.MAX_LINE + 10) + b"\nIMEI:1\n"], 3, 1,
     [(2, None, "not UTF-8: invalid start byte at byte 0"),
      (3, None, f"line longer than {D.MAX_LINE} bytes")]),
    # not UTF-8, then a line over the limit skipped while its newline is awaited; the newline
    # comes first in the next read
    ([b"devId\n\xff\n" + b"x" * (D.MAX_LINE + 10), b"\nIMEI:1\n"], 3, 1,
     [(2, None, "not UTF-8: invalid start byte at byte 0"),
      (3, None, f"line longer than {D.MAX_LINE} bytes")]),
])
def test_every_rejected_line_is_counted_as_a_row(tmp_path, feeds, n_rows, n_created, errs):
    res = in_store(tmp_path, lambda s: import_into(s, feeds))
    assert errors(res) == errs
    assert (res.rows, res.created, res.rejected) == (n_rows, n_created, len(errs))


def test_ndjson_errors_name_the_records_own_field(tmp_path):
    """NDJSON rows are named by the record's field path, never the CSV column's camelCase."""
    body = b'{"dev_id": "IMEI:1", "last_contact": "yesterday"}\n'
    res = in_store(tmp_path, lambda s: import_into(s, [body], "ndjson"))
    assert errors(res) == [(1, "last_contact",
                            "Expected `float | null`, got `str` - at `$.last_contact`")]


def test_ndjson_rows_the_store_refuses_are_named_by_their_line(tmp_path):
    body = (b'{"dev_id": "IMEI:1"}\n'
            b"\n"
            b'{"dev_id": "bad id"}\n'
            b'{"dev_id": "IMEI:2"}\n'
            b'{"dev_id": "IMEI:1"}\n')

    async def scenario(s):
        first = await import_into(s, [body], "ndjson")
        again = await import_into(s, [b"\n\n" + body], "ndjson", replace=True)
        return first, again
    first, again = in_store(tmp_path, scenario)
    assert errors(first) == [(3, "dev_id", ID_RULE),
                             (5, "dev_id", "device 'IMEI:1' already exists")]
    assert (first.rows, first.created, first.rejected) == (4, 2, 2)
    assert errors(again) == [(5, "dev_id", ID_RULE)]
    assert (again.rows, again.created, again.replaced) == (4, 0, 3)


def test_the_first_errors_by_line_when_the_stores_come_back_after_later_parse_errors(tmp_path):
    """Rows 2 and 3 are refused by the store (reported when the chunk comes back), rows 4 and
    5 by the parser (found first): with room for two, rows 2 and 3 are kept."""
    body = (b"devId,imei\n"
            b"IMEI:1,notdigits\n"
            b"IMEI:2,alsobad\n"
            b"IMEI:3,,x\n"
            b"IMEI:4,,x\n")
    res = in_store(tmp_path, lambda s: import_into(s, [body], max_errors=2))
    assert errors(res) == [(2, "imei", IMEI_RULE),
                           (3, "imei", IMEI_RULE)]
    assert (res.rows, res.rejected, res.errors_omitted) == (4, 4, 2)


class GatedStore:
    """The LMDB store behind a gate: its imports wait until the test opens it (a slow disk)."""

    def __init__(self, store):
        self.store = store
        self.gate = asyncio.Event()

    async def import_devices(self, rows, **kw):
        await self.gate.wait()
        return await self.store.import_devices(rows, **kw)


def test_the_upload_waits_while_two_chunks_are_still_being_written(tmp_path):
    """Back-pressure: with two chunks handed to the store and not written, the import stops
    reading the upload (feed does not return) until the oldest is written."""
    async def scenario(s):
        g = GatedStore(s)
        imp = D.DeviceImport(g, "ndjson", chunk=1)
        try:
            await imp.feed(padded("IMEI:1", D.BLOCK) + b"\n")
            await imp.feed(padded("IMEI:2", D.BLOCK) + b"\n")
            third = asyncio.ensure_future(imp.feed(padded("IMEI:3", D.BLOCK) + b"\n"))
            for _ in range(20):
                await asyncio.sleep(0)
            waited = not third.done()
            g.gate.set()
            await third
            res = await imp.finish()
        finally:
            await imp.close()
        return waited, res, [(await s.get_device(f"IMEI:{i}")).dev_id for i in (1, 2, 3)]
    waited, res, ids = in_store(tmp_path, scenario)
    assert waited
    assert (res.rows, res.created, res.rejected) == (3, 3, 0)
    assert ids == ["IMEI:1", "IMEI:2", "IMEI:3"]


def test_a_line_of_exactly_the_limit_is_a_row_one_byte_more_is_not(tmp_path):
    async def scenario(s):
        whole = await import_into(s, [padded("IMEI:1", D.MAX_LINE) + b"\n"], "ndjson")
        split = await import_into(s, [padded("IMEI:2", D.MAX_LINE), b"\n"], "ndjson")
        over = await import_into(s, [padded("IMEI:3", D.MAX_LINE + 1) + b"\n"], "ndjson")
        return whole, split, over
    whole, split, over = in_store(tmp_path, scenario)
    assert (errors(whole), whole.rows, whole.created) == ([], 1, 1)
    assert (errors(split), split.rows, split.created) == ([], 1, 1)
    assert errors(over) == [(1, None, f"line longer than {D.MAX_LINE} bytes")]
    assert (over.rows, over.created) == (1, 0)


@pytest.mark.parametrize("pieces", [1, 40])
def test_a_header_over_the_limit_is_refused_as_the_header(tmp_path, pieces):
    """Whole in one read, or in many (as over HTTP): the long first line is the header, refused
    — not skipped as row 1 with the next line then taken for the header."""
    long = b"devId," + b"x" * (2 * D.MAX_LINE)      # in many reads: over the limit before
    for n, body in enumerate([long + b"\nIMEI:1\n",      # its newline has come
                              b"\n" + long + b"\ndevId\nIMEI:1\n"]):
        with pytest.raises(ValidationError) as ei:
            run_import(tmp_path / str(n), body, pieces=pieces)
        assert (str(ei.value), ei.value.where) == (
            f"the header row is longer than {D.MAX_LINE} bytes", "header")


def test_line_numbers_after_a_skipped_line(tmp_path):
    """A line over the limit skipped while its newline is awaited: the lines after it keep
    their numbers — when the skip comes after the header in the same pending chunk, and when
    the read before ended exactly at a newline (a blank line before the long one)."""
    long = b"IMEI:1," + b"9" * (2 * D.MAX_LINE)
    body = (b"devId,imei\n" + long + b"\nIMEI:2,,x\n"
            b"IMEI:356938035643809,356938035643809\n")
    res, got = run_import(tmp_path, body, pieces=40, read=("IMEI:356938035643809",))
    assert errors(res) == [(2, None, f"line longer than {D.MAX_LINE} bytes"),
                           (3, None, "3 fields, the header has 2")]
    assert (res.rows, res.created, res.rejected) == (3, 1, 2)
    feeds = [b"devId\n" + b"\n" * D.BLOCK,                 # read whole: the buffer is empty
             b"\n" + b"x" * (D.MAX_LINE + 10),             # a blank line, then a long one
             b"\nIMEI:2,x\nIMEI:1\n"]
    res = in_store(tmp_path / "2", lambda s: import_into(s, feeds))
    n = D.BLOCK + 2                                        # the blank line the 2nd read ends
    assert errors(res) == [(n + 1, None, f"line longer than {D.MAX_LINE} bytes"),
                           (n + 2, None, "2 fields, the header has 1")]
    assert (res.rows, res.created, res.rejected) == (3, 1, 2)


def test_an_upload_that_breaks_off_still_has_its_chunks_written(tmp_path):
    """No ``finish``: ``close`` waits for the chunks handed to the store and returns."""
    async def scenario(s):
        imp = D.DeviceImport(s, "ndjson", chunk=1)
        await imp.feed(padded("IMEI:1", D.BLOCK) + b"\n")
        await imp.feed(padded("IMEI:2", D.BLOCK) + b"\n")
        await imp.close()
        return [(await s.get_device(f"IMEI:{i}")).dev_id for i in (1, 2)]
    assert in_store(tmp_path, scenario) == ["IMEI:1", "IMEI:2"]


def test_a_failed_write_of_an_upload_that_broke_off_is_not_logged_as_unretrieved(tmp_path):
    """The store fills up while the upload breaks off: ``close`` collects the failure (asyncio
    logs nothing about an exception never retrieved)."""
    async def scenario(s):
        loop = asyncio.get_running_loop()
        seen = []
        loop.set_exception_handler(lambda _loop, context: seen.append(context.get("message")))
        imp = D.DeviceImport(s, "csv", chunk=10)
        await imp.feed(b"devId,capability\n" +
                       b"".join(b"IMEI:%d,%s\n" % (i, b"c" * 100) for i in range(20000)))
        await imp.close()
        del imp
        gc.collect()
        await asyncio.sleep(0)
        return seen
    assert in_store(tmp_path, scenario, map_size=1 << 20, max_map_size=1 << 20) == []


# --- policy 40 over HTTP: the outgoing-URL guard and whose session is closed ------------------

class RecordingGuard(UrlGuard):
    """The URL guard, keeping the sessions it makes (to see that the callback closes them)."""

    def session(self, **kw):
        s = super().session(**kw)
        self.made.append(s)
        return s


def carrier_call(make_callback, host="127.0.0.1", after=None):
    """Runs ``make_callback(url)`` against a carrier on loopback that accepts; → what
    ``check_device_policy`` decided (twice, the same callback) and the bodies the carrier got."""
    async def main():
        asked = []

        async def handler(request):
            asked.append(await request.json())
            return web.json_response({"decision": "accept"})
        runner, port = await local_http(web.post("/policy", handler))
        try:
            url = f"http://{host}:{port}/policy"
            cb = await make_callback(url)
            record = Device(dev_id="IMEI:490154203237518", imei="490154203237518")
            out = []
            for _ in range(2):
                d = await D.check_device_policy(40, record, f"IMEI:{REC}", task_id="t1",
                                                callback=cb)
                out.append((d.accept, d.cause))
            return out, len(asked)
        finally:
            if after is not None:
                await after()
            await runner.cleanup()
    return asyncio.run(main())


def test_a_guard_that_allows_the_carrier_lets_it_answer_and_its_sessions_are_closed():
    guard = RecordingGuard.from_config(allow_networks=["127.0.0.1/32"])
    guard.made = []

    async def make(url):
        return D.http_carrier_callback(url, guard=guard, timeout=5)
    out, asked = carrier_call(make)
    assert out == [(True, "policy 40: the carrier accepted")] * 2 and asked == 2
    assert len(guard.made) == 2 and all(s.closed for s in guard.made)


def test_a_carrier_name_the_guard_refuses_when_connecting_is_never_asked():
    """``localhost`` passes the literal check (a name) and is refused by the guard's resolver
    when connecting: the callback's session is the guard's."""
    async def make(url):
        return D.http_carrier_callback(url, guard=UrlGuard(), timeout=5)
    out, asked = carrier_call(make, host="localhost")
    assert asked == 0
    assert out == [(False, "refused by acceptDevicePolicy 40: carrier callback failed "
                           "(ClientConnectorDNSError)")] * 2


def test_a_session_given_to_the_carrier_callback_stays_open():
    given = []

    async def make(url):
        s = aiohttp.ClientSession()
        given.append(s)
        return D.http_carrier_callback(url, session=s, timeout=5)
    open_after = []

    async def after():
        open_after.append(not given[0].closed)
        await given[0].close()
    out, asked = carrier_call(make, after=after)
    assert out == [(True, "policy 40: the carrier accepted")] * 2 and asked == 2
    assert open_after == [True]
