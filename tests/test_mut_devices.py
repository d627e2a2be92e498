"""Issue 18, mutmut's survivors in dmengine/devices.py: every acceptDevicePolicy decision with
its cause, device merge-patches, and the streamed import (importDeviceInstances) fed byte by
byte into a real LMDB store, each rejected row compared whole (line, column, message)."""
from __future__ import annotations

import asyncio
import datetime

import pytest

from dmengine import devices as D
from dmengine.errors import ValidationError
from dmengine.model import Device
from dmengine.store.lmdb import LmdbStore

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
    ("$.tags[0][1]", "tags", "tags[0][1]"),
    ("imei", "imei", "imei"),
])
def test_where_a_store_error_points(where, csv, ndjson):
    assert D._csv_where(where) == csv
    assert D._json_where(where) == ndjson
