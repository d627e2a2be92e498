"""WBXML codec: the shared vectors, every rejection rule, the limits, encode, round trips."""
from __future__ import annotations

import ast
import inspect
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmengine import _wbxml
from dmengine.errors import CodecError
from dmengine.message import Chal, Command, Cred, Element, Item, Message, Meta, SyncHdr

from conftest import BENCH_MESSAGES, VECTORS, shared_files

GOOD = [p for p in shared_files(VECTORS, "*.wbxml") if not p.name.startswith("bad-")]
BAD = shared_files(VECTORS, "bad-*.wbxml")
BENCH = shared_files(BENCH_MESSAGES, "*.wbxml")
HDR = bytes([0x03, 0xA4, 0x01, 0x6A, 0x00])        # WBXML 1.3, 0x1201, UTF-8, empty string table
MIN_HDR_BODY = bytes.fromhex("6d6c7103312e320001") + b"\x01"   # <SyncML><SyncHdr><VerDTD>1.2</VerDTD></SyncHdr>

# xml2wbxml 0.11.8 output for a Results Item with Type application/vnd.syncml.dmtnds+xml and a
# MgmtTree in Data (the XML is in test_libwbxml_oracle.TNDS_XML): libwbxml compiled the tree into
# a nested WBXML document (literal FPI -//OMA//DTD-DM-DDF 1.2//EN, code page 2) inside OPAQUE and
# rewrote the Type to +wbxml.
LIBWBXML_TNDS = bytes.fromhex(
    "03a4016a006d6c7103312e3200017203444d2f312e32000165033100015b033100016e5703494d45493a310001"
    "01675703687474703a2f2f782f000101016b624b033100015c033100014c03320001546757032e2f446576496e"
    "666f0001015a00014703786d6c000153036170706c69636174696f6e2f766e642e73796e636d6c2e646d746e64"
    "732b7762786d6c00010100004fc34e0300006a1b2d2f2f4f4d412f2f4454442d444d2d44444620312e322f2f45"
    "4e000002607703312e320001646603446576496e666f00016466034d616e00016f5c0b01017603416"
    "36d650001010101010101120101")


# xml2wbxml 0.11.8 output for a Results whose command Meta Type is application/vnd.syncml-devinf+xml
# with a DevInf document in the Item's Data: a nested WBXML DevInf 1.2 document (public id 0x1203,
# code page 0) inside OPAQUE, Type rewritten to +wbxml.
LIBWBXML_DEVINF = bytes.fromhex(
    "03a4016a006d6c7103312e3200017203444d2f312e32000165033100015b033100016e5703494d45493a310001"
    "01675703687474703a2f2f782f000101016b624b033100015c033100014c033200015a000153036170706c6963"
    "6174696f6e2f766e642e73796e636d6c2d646576696e662b7762786d6c0001010000546757032e2f646576696e"
    "6631320001014fc32a03a4036a004a6503312e320001510341636d6500014903494d45493a3100014b0370686f"
    "6e6500012801010101120101")


def body(*parts: bytes) -> bytes:
    """HDR + <SyncML><SyncHdr><VerDTD>1.2</VerDTD></SyncHdr><SyncBody> parts </SyncBody></SyncML>."""
    return HDR + MIN_HDR_BODY + b"\x6b" + b"".join(parts) + b"\x01\x01"


def decode_err(data: bytes, **kw) -> CodecError:
    with pytest.raises(CodecError) as ei:
        _wbxml.decode(data, **kw)
    assert ei.value.offset is not None and 0 <= ei.value.offset <= len(data)
    return ei.value


# --- the shared vectors ---------------------------------------------------------------


@pytest.mark.parametrize("path", GOOD + BENCH, ids=lambda p: p.name)
def test_good_vectors_decode_and_round_trip(path):
    msg = _wbxml.decode(path.read_bytes())
    assert isinstance(msg, Message)
    assert msg.hdr.ver_dtd == "1.2" and msg.hdr.ver_proto == "DM/1.2"
    assert msg.commands and all(isinstance(c, Command) for c in msg.commands)
    assert _wbxml.decode(_wbxml.encode(msg)) == msg
    assert _wbxml.decode(_wbxml.encode(msg, string_table=True)) == msg


def test_vector_01_content():
    msg = _wbxml.decode((VECTORS / "01-pkg1-client-init.wbxml").read_bytes())
    h = msg.hdr
    assert (h.session_id, h.msg_id, h.target, h.source, h.source_name) == (
        "1A2B", "1", "https://dm.example.com/dm", "IMEI:356938035643809", "dmclient01")
    assert h.cred == Cred(meta=Meta(format="b64", type="syncml:auth-md5"), data="tm7hGTZC6ySmdLd9yJZRmw==")
    assert h.meta == Meta(max_msg_size="10000", max_obj_size="524288")
    alert, replace = msg.commands
    assert (alert.name, alert.cmd_id, alert.data) == ("Alert", "1", "1200")
    assert replace.name == "Replace"
    # Item Data was OPAQUE (libwbxml's heuristic) and is valid UTF-8: it comes back as str
    assert [(i.source, i.data) for i in replace.items] == [
        ("./DevInfo/DevId", "IMEI:356938035643809"), ("./DevInfo/Man", "ExampleCorp"),
        ("./DevInfo/Mod", "EX-100"), ("./DevInfo/DmV", "1.2"), ("./DevInfo/Lang", "en-US")]
    assert msg.final is True


def test_string_table_literal_fpi_and_nostr_variants_are_equal():
    a = _wbxml.decode((VECTORS / "01-pkg1-client-init.wbxml").read_bytes())       # STR_T
    b = _wbxml.decode((VECTORS / "01-pkg1-client-init.nostr.wbxml").read_bytes())  # STR_I only
    c = _wbxml.decode((VECTORS / "01-pkg1-client-init.literal-fpi.wbxml").read_bytes())
    assert a == b == c


def test_vector_02_status_chal_exec():
    msg = _wbxml.decode((VECTORS / "02-pkg2-server-get-replace-exec.wbxml").read_bytes())
    st0 = msg.commands[0]
    assert (st0.name, st0.msg_ref, st0.cmd_ref, st0.cmd, st0.data) == ("Status", "1", "0", "SyncHdr", "212")
    assert st0.target_refs == ["https://dm.example.com/dm"] and st0.source_refs == ["IMEI:356938035643809"]
    assert st0.chal == Chal(meta=Meta(format="b64", type="syncml:auth-md5", next_nonce="VWZ3iJmqu8zd7v8AESIzRA=="))
    assert msg.hdr.resp_uri == "https://dm.example.com/dm?s=1A2B-7f3c"
    exe = msg.commands[-1]
    assert (exe.name, exe.correlator, exe.items[0].target) == ("Exec", "fw-job-8842", "./FUMO/1/DownloadAndUpdate")
    assert msg.commands[1].target_refs is None       # absent lists are None, never []


def test_vector_06_large_object():
    msg = _wbxml.decode((VECTORS / "06-large-object-moredata.wbxml").read_bytes())
    rep = msg.commands[1]
    assert rep.meta == Meta(format="b64", type="application/octet-stream")
    item = rep.items[0]
    assert item.meta == Meta(size="1536") and item.more_data is True
    assert isinstance(item.data, str) and len(item.data) == 1364
    assert msg.final is False


def test_vector_07_atomic_sequence_nesting():
    msg = _wbxml.decode((VECTORS / "07-atomic-sequence.wbxml").read_bytes())
    names = [(c.name, [s.name for s in c.commands or []]) for c in msg.commands]
    assert names[3:] == [("Atomic", ["Add", "Add", "Replace"]), ("Sequence", ["Alert", "Delete", "Exec"]),
                         ("Alert", [])]
    assert msg.commands[3].commands[2].items[0].data == "Get=acme-dms&Replace=acme-dms&Delete=acme-dms"


def test_libwbxml_nested_tnds_becomes_element_tree():
    msg = _wbxml.decode(LIBWBXML_TNDS)
    item = msg.commands[0].items[0]
    assert item.meta.type == "application/vnd.syncml.dmtnds+wbxml"
    assert item.data == Element(tag="MgmtTree", xmlns="syncml:dmddf1.2", children=[
        Element(tag="VerDTD", text="1.2"),
        Element(tag="Node", children=[
            Element(tag="NodeName", text="DevInfo"),
            Element(tag="Node", children=[
                Element(tag="NodeName", text="Man"),
                Element(tag="RTProperties", children=[Element(tag="Format", children=[Element(tag="chr")])]),
                Element(tag="Value", text="Acme")])])])
    again = _wbxml.encode(msg)
    assert _wbxml.decode(again) == msg
    # our nested document is byte-identical to libwbxml's (same header, literal FPI, page 2)
    nested = LIBWBXML_TNDS[LIBWBXML_TNDS.index(b"\xc3\x4e") + 2:][:0x4e]
    assert nested in again


def test_libwbxml_nested_devinf_becomes_element_tree():
    msg = _wbxml.decode(LIBWBXML_DEVINF)
    res = msg.commands[0]
    assert res.meta.type == "application/vnd.syncml-devinf+wbxml"     # on the command: in force
    assert res.items[0].data == Element(tag="DevInf", xmlns="syncml:devinf", children=[
        Element(tag="VerDTD", text="1.2"), Element(tag="Man", text="Acme"), Element(tag="DevID", text="IMEI:1"),
        Element(tag="DevTyp", text="phone"), Element(tag="UTC")])
    again = _wbxml.encode(msg)
    assert _wbxml.decode(again) == msg
    nested = LIBWBXML_DEVINF[LIBWBXML_DEVINF.index(b"\xc3\x2a") + 2:][:0x2a]
    assert nested in again                                           # byte-identical to libwbxml's


def test_devinf_xml_type_is_rewritten_on_encode():
    tree = Element(tag="DevInf", xmlns="syncml:devinf", children=[Element(tag="Man", text="Acme")])
    msg = Message(commands=[Command(name="Results", cmd_id="1", items=[
        Item(meta=Meta(type="application/vnd.syncml-devinf+xml"), data=tree)])])
    item = _wbxml.decode(_wbxml.encode(msg)).commands[0].items[0]
    assert item.meta.type == "application/vnd.syncml-devinf+wbxml" and item.data == tree


def test_opaque_without_tnds_type_stays_bytes_or_str():
    nested = bytes.fromhex("0300006a00")                              # valid UTF-8 -> str
    msg = _wbxml.decode(body(b"\x46\x4b\x03" b"1\x00\x01\x54\x4f\xc3\x05" + nested + b"\x01\x01\x01"))
    assert msg.commands[0].items[0].data == nested.decode()
    msg = _wbxml.decode(body(b"\x46\x4b\x03" b"1\x00\x01\x54\x4f\xc3\x02\xff\xfe\x01\x01\x01"))
    assert msg.commands[0].items[0].data == b"\xff\xfe"                # not UTF-8 -> bytes


def test_tnds_type_on_command_meta_applies_to_items():
    tree = Element(tag="MgmtTree", xmlns="syncml:dmddf1.2", children=[Element(tag="VerDTD", text="1.2")])
    msg = Message(hdr=SyncHdr(ver_dtd="1.2"), commands=[Command(
        name="Replace", cmd_id="1", meta=Meta(type="application/vnd.syncml.dmtnds+xml"),
        items=[Item(target="./x", data=tree)])])
    out = _wbxml.decode(_wbxml.encode(msg))
    rep = out.commands[0]
    assert rep.meta.type == "application/vnd.syncml.dmtnds+wbxml"     # rewritten, like libwbxml
    assert rep.items[0].data == tree


@pytest.mark.parametrize("nested, reason", [
    (bytes.fromhex("0300006a05") + b"-//X\x00" + b"\x00\x02\x60\x01", "unknown public id '-//X'"),
    (bytes.fromhex("03a4016a00") + b"\x00\x02\x60\x01", "unknown public id 0x1201 for a TNDS"),
    (bytes.fromhex("0301") + b"\x6a\x00\x00\x03\x60\x01", "unknown code page 3"),
    (bytes.fromhex("0301") + b"\x6a\x00\x6d\x01", "unexpected <SyncML> in a nested document"),
    (bytes.fromhex("0301") + b"\x6a\x00\x00\x02\x60\x01\x01", "1 bytes after the nested document"),
    (bytes.fromhex("0301") + b"\x6a\x00\x00\x02\x60", "truncated"),
])
def test_nested_document_errors(nested, reason):
    item = (b"\x54\x5a\x00\x01\x53\x03" + b"application/vnd.syncml.dmtnds+wbxml\x00\x01\x01\x00\x00"
            b"\x4f\xc3" + bytes([len(nested)]) + nested + b"\x01\x01")
    assert reason in decode_err(body(b"\x46\x4b\x031\x00\x01" + item + b"\x01")).reason


def test_nested_document_in_several_pieces():
    """Data pieces are concatenated before the nested document is decoded."""
    nested = bytes.fromhex("0301") + b"\x6a\x00\x00\x02\x60\x77\x03" + b"1.2\x00\x01\x01"
    split = b"\xc3\x04" + nested[:4] + b"\xc3" + bytes([len(nested) - 4]) + nested[4:]
    item = (b"\x54\x5a\x00\x01\x53\x03" + b"application/vnd.syncml.dmtnds+wbxml\x00\x01\x01\x00\x00"
            b"\x4f" + split + b"\x01\x01")
    msg = _wbxml.decode(body(b"\x46\x4b\x031\x00\x01" + item + b"\x01"))
    assert msg.commands[0].items[0].data == Element(tag="MgmtTree", xmlns="syncml:dmddf1.2",
                                                    children=[Element(tag="VerDTD", text="1.2")])
    # a text-only Data under that Type stays text (no OPAQUE, no nested document)
    item = (b"\x54\x5a\x00\x01\x53\x03" + b"application/vnd.syncml.dmtnds+wbxml\x00\x01\x01\x00\x00"
            b"\x4f\x03abc\x00\x01\x01")
    assert _wbxml.decode(body(b"\x46\x4b\x031\x00\x01" + item + b"\x01")).commands[0].items[0].data == "abc"


def test_nested_devinf_errors():
    nested = bytes.fromhex("0301") + b"\x6a\x00\x00\x02\x4a\x01"       # DevInf has no page 2
    item = (b"\x54\x5a\x00\x01\x53\x03" + b"application/vnd.syncml-devinf+wbxml\x00\x01\x01\x00\x00"
            b"\x4f\xc3" + bytes([len(nested)]) + nested + b"\x01\x01")
    assert "unknown code page 2" in decode_err(body(b"\x46\x4b\x031\x00\x01" + item + b"\x01")).reason


def test_nested_tnds_errors():
    bad_fpi = bytes.fromhex("0300006a05") + b"-//X\x00" + b"\x00\x02\x60\x01"
    item = (b"\x54\x5a\x00\x01\x53\x03" + b"application/vnd.syncml.dmtnds+wbxml\x00\x01\x01\x00\x00"
            b"\x4f\xc3" + bytes([len(bad_fpi)]) + bad_fpi + b"\x01\x01")
    err = decode_err(body(b"\x46\x4b\x031\x00\x01" + item + b"\x01"))
    assert "public id" in err.reason


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_vectors_raise_codec_error(path):
    decode_err(path.read_bytes())


@pytest.mark.parametrize("name, reason", [
    ("bad-01-truncated.wbxml", "truncated"),
    ("bad-02-wrong-publicid.wbxml", "unknown public id 0x000A"),
    ("bad-04-huge-mbuint32.wbxml", "longer than 5 bytes"),
    ("bad-06-strt-out-of-range.wbxml", "string table offset 5000 out of range"),
    ("bad-07-unknown-codepage.wbxml", "unknown code page 7"),
    ("bad-08-missing-end.wbxml", "truncated"),
    ("bad-09-unterminated-str-i.wbxml", "unterminated inline string"),
])
def test_bad_vector_reasons(name, reason):
    assert reason in decode_err((VECTORS / name).read_bytes()).reason


def test_deep_nesting_rejected_at_the_limit_not_by_recursion():
    # bad-03's 100 000 nested Sequence tags, behind a valid SyncHdr so nesting is what fails
    data = HDR + MIN_HDR_BODY + b"\x6b" + b"\x64" * 100_000
    err = decode_err(data)
    assert "max_depth=32" in err.reason and err.offset < 100
    assert "max_depth=5" in decode_err(data, max_depth=5).reason


def test_opaque_overrun_checked_before_allocating():
    # bad-05's OPAQUE of 0x0FFFFFFF bytes with 4 left, inside an Alert's Data
    data = body(b"\x46\x4f\xc3\x80\xff\xff\xff\x7fAAAA")
    assert "268435455 beyond the 6 bytes left" in decode_err(data, max_string=1 << 40).reason


@pytest.mark.parametrize("data, reason", [
    (b"", "truncated"),
    (b"\x04\xa4\x01\x6a\x00", "unknown WBXML version 0x04"),
    (b"\x13\xa4\x01\x6a\x00", "unknown WBXML version"),
    (b"\x03\x0a\x6a\x00", "unknown public id 0x000A"),
    (b"\x03\x01\x6a\x00", "unknown public id 0x0001"),
    (b"\x03\xa4\x01\x04\x00", "unsupported charset MIBenum 4"),
    (b"\x03\xa4\x01\x6a\x8f\xff\xff\xff\x7f", "string table length 4294967295 beyond"),
    (b"\x03\xa4\x01\x6a\x9f\xff\xff\xff\x7f", "above 0xFFFFFFFF"),
    (b"\x03\x00\x05\x6a\x03ab\x00", "index 5 out of range"),
    (b"\x03\x00\x00\x6a\x08-//X//Y\x00", "unknown public id"),
    (b"\x03\x00\x00\x6a\x03abc", "unterminated public id string"),
    (HDR + b"\x01", "expected the SyncML root"),
    (HDR + b"\x6c\x01", "<SyncHdr> as root element"),
    (HDR + b"\x6d\x6b\x01\x01", "SyncML without SyncHdr"),
    (HDR + b"\x6d\x6c\x01\x01", "SyncML without SyncBody"),
    (body() + b"\x01", "1 bytes after the end"),                                  # unbalanced END
    (body(b"\xe6\x01"), "tag with attributes"),                                    # Alert|attr
    (body(b"\x04\x00"), "unsupported token 0x04"),                                 # LITERAL
    (body(b"\x44\x00\x01"), "unsupported token 0x44"),                             # LITERAL_C
    (body(b"\xc0"), "unsupported token 0xC0"),                                     # EXT_0
    (body(b"\x43\x01"), "unsupported token 0x43"),                                 # PI
    (body(b"\x6a\x01"), "unexpected <Sync> in <SyncBody>"),                        # not DM
    (body(b"\x7f\x01"), "unknown tag 0x3F on code page 0"),
    (body(b"\x00\x01\x47\x01"), "unexpected <Format> in <SyncBody>"),
    (body(b"\x00\x02"), "unknown code page 2"),
    (body(b"\x46\x4f\x03abc"), "unterminated inline string"),
    (body(b"\x46\x4b\x03\xff\x00\x01\x01"), "invalid UTF-8"),
    (body(b"\x46\x4b\x83\x00\x01\x01"), "string table offset 0 out of range"),
    (body(b"\x46\x4f\x02\x83\xb8\x00\x01\x01"), "is not a character"),          # surrogate
    (body(b"\x46\x4f\x02\xc4\x80\x80\x00\x01\x01"), "is not a character"),          # > 0x10FFFF
    (body(b"\x46\x4b\x46\x01\x01\x01"), "element inside a text value"),
    (body(b"\x46\x03x\x00\x01"), "unexpected text in <Alert>"),
    (body(b"\x52\x03x\x00\x01"), "content in empty element <Final>"),
    (body(b"\x46\x54\x67\x59\x01\x01\x01\x01"), "unexpected <MapItem> in <Source>"),
    (body(b"\x53\x46\x01\x01"), "unexpected <Alert> in <Get>"),                     # only in containers
    (body(b"\x60\x14\x5a\x01\x01"), "<Meta> after <Item> in <Replace>"),            # DTD order
])
def test_rejections(data, reason):
    assert reason in decode_err(data).reason


def test_error_names_offset_and_expectation():
    err = decode_err((VECTORS / "bad-07-unknown-codepage.wbxml").read_bytes())
    assert err.offset == 7 and "SyncML" in err.expected and "offset 7" in str(err)


def test_every_truncation_of_every_vector_raises_codec_error():
    for path in GOOD:
        data = path.read_bytes()
        for n in range(len(data)):
            with pytest.raises(CodecError):
                _wbxml.decode(data[:n])


# --- accepted variants ------------------------------------------------------------------


def test_accepted_header_variants():
    ref = _wbxml.decode(body(b"\x12"))
    same = [
        b"\x03\x9f\x53\x6a\x00",                                  # SyncML 1.1 (0x0FD3)
        b"\x02\xa4\x01\x6a\x00",                                  # WBXML 1.2
        b"\x01\xa4\x01\x6a\x00",                                  # WBXML 1.1
        b"\x00\xa4\x01\x00",                                      # WBXML 1.0: no charset field
        b"\x03\xa4\x01\x00\x00",                                  # charset 0 (unknown) read as UTF-8
    ]
    fpis = [b"-//SYNCML//DTD SyncML 1.2//EN", b"-//syncml//dtd syncml 1.2//en",
            b"-//SYNCML//DTD_SyncML_1.2//EN", b"-//SYNCML//DTD SYNCML 1.1//EN"]
    for fpi in fpis:
        same.append(b"\x03\x00\x00\x6a" + bytes([len(fpi) + 1]) + fpi + b"\x00")
    for hdr in same:
        assert _wbxml.decode(hdr + body(b"\x12")[len(HDR):]) == ref, hdr


def test_text_pieces_are_concatenated():
    # Data = STR_I "a" + ENTITY U+00E9 + STR_T "bc" + OPAQUE "d" + ENTITY U+1F600
    st = b"xbc\x00"
    data = (b"\x03\xa4\x01\x6a\x04" + st + MIN_HDR_BODY + b"\x6b\x46\x4f\x03a\x00\x02\x81\x69\x83\x01"
            b"\xc3\x01d\x02\x87\xec\x00\x01\x01\x01\x01")
    assert _wbxml.decode(data).commands[0].data == "a\u00e9bcd\U0001F600"


def test_empty_elements_and_lazy_page_switches():
    # <Alert/>, then Get with Meta whose MetInf Format is empty; page stays 1 after Meta (as libwbxml)
    data = body(b"\x06", b"\x53\x4b\x03" b"1\x00\x01\x5a\x00\x01\x07\x01\x00\x00\x14\x01")
    alert, get = _wbxml.decode(data).commands
    assert alert == Command(name="Alert")
    assert get.meta == Meta(format="") and get.items == [Item()]


def test_meta_extra_elements():
    # EMI text, Mem with FreeMem/FreeID children, Anchor/Next, MetInf inside Meta
    data = body(b"\x46\x4b\x03" b"1\x00\x01\x54\x5a\x00\x01\x46\x03e\x00\x01\x4d\x49\x03" b"9\x00\x01\x48\x03"
                b"7\x00\x01\x01\x45\x4f\x03n\x00\x01\x01\x01\x01\x01")
    meta = _wbxml.decode(data).commands[0].items[0].meta
    assert meta.extra == [("EMI", "e"), ("Mem", [("FreeMem", "9"), ("FreeID", "7")]), ("Anchor", [("Next", "n")])]
    assert _wbxml.decode(_wbxml.encode(_wbxml.decode(data))) == _wbxml.decode(data)


# --- limits -----------------------------------------------------------------------------


def test_limits_are_parameters_with_named_defaults():
    sig = inspect.signature(_wbxml.decode)
    assert sig.parameters["max_depth"].default == _wbxml.DEFAULT_MAX_DEPTH == 32
    assert sig.parameters["max_size"].default == _wbxml.DEFAULT_MAX_SIZE
    assert sig.parameters["max_string"].default == _wbxml.DEFAULT_MAX_STRING
    assert all(p.kind is p.KEYWORD_ONLY for n, p in sig.parameters.items() if n != "data")


def test_max_size():
    data = (BENCH_MESSAGES / "msg_c.wbxml").read_bytes()
    _wbxml.decode(data, max_size=len(data))
    err = decode_err(data, max_size=len(data) - 1)
    assert "over max_size" in err.reason


def test_max_depth():
    data = (VECTORS / "07-atomic-sequence.wbxml").read_bytes()
    # SyncML/SyncBody/Sequence/Alert/Item/Data = 6
    _wbxml.decode(data, max_depth=6)
    assert "max_depth=5" in decode_err(data, max_depth=5).reason


def test_max_string():
    data = (VECTORS / "06-large-object-moredata.wbxml").read_bytes()
    _wbxml.decode(data, max_string=1364)
    assert "max_string=1363" in decode_err(data, max_string=1363).reason
    assert "max_string=2" in decode_err(body(b"\x46\x4b\x03" b"123\x00\x01\x01"), max_string=2).reason


def test_decode_wants_bytes():
    data = (VECTORS / "10-session-abort-1223.wbxml").read_bytes()
    assert _wbxml.decode(bytearray(data)) == _wbxml.decode(memoryview(data)) == _wbxml.decode(data)
    with pytest.raises(TypeError):
        _wbxml.decode(5)


# --- encode -------------------------------------------------------------------------------


def sample() -> Message:
    return Message(
        hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1A2B", msg_id="2",
                    target="IMEI:356938035643809", source="https://dm.example.com/dm",
                    resp_uri="https://dm.example.com/dm?s=1", cred=Cred(meta=Meta(format="b64", type="syncml:auth-md5"), data="eA=="),
                    meta=Meta(max_msg_size="65536")),
        commands=[
            Command(name="Status", cmd_id="1", msg_ref="1", cmd_ref="0", cmd="SyncHdr",
                    target_refs=["https://dm.example.com/dm"], source_refs=["IMEI:356938035643809"],
                    chal=Chal(meta=Meta(format="b64", type="syncml:auth-md5", next_nonce="AAAA")), data="212"),
            Command(name="Results", cmd_id="2", msg_ref="1", cmd_ref="4", meta=Meta(format="chr"),
                    target_refs=["./a"], items=[Item(source="./DevInfo/Man", data="Acme")]),
            Command(name="Replace", cmd_id="3", items=[Item(target="./bin", data=b"\x00\xff\x01"),
                                                        Item(target="./nul", data="a\x00b")]),
            Command(name="Sequence", cmd_id="4", commands=[
                Command(name="Alert", cmd_id="5", data="1101", items=[Item(data="MINDT=5")]),
                Command(name="Exec", cmd_id="6", correlator="c1", items=[Item(target="./FUMO/1/Update")])]),
        ],
        final=True)


def test_encode_header_and_dtd_order():
    out = _wbxml.encode(sample())
    assert out[:5] == HDR                                  # 1.3, 0x1201, UTF-8, no string table
    msg = _wbxml.decode(out)
    assert msg == sample()
    results = out[out.index(b"\x62\x4b"):]                 # Results: CmdID MsgRef CmdRef Meta TargetRef
    assert results.index(b"\x5a") < results.index(b"\x6f")
    status = out[out.index(b"\x69\x4b"):]                  # Status: ... TargetRef SourceRef Chal Data
    assert status.index(b"\x6f") < status.index(b"\x68") < status.index(b"\x49") < status.index(b"\x4f")


def test_encode_data_kinds():
    out = _wbxml.encode(sample())
    assert b"\x4f\xc3\x03\x00\xff\x01\x01" in out          # bytes -> OPAQUE
    assert b"\x4f\xc3\x03a\x00b\x01" in out                # str holding NUL -> OPAQUE
    assert b"\x4f\x03" + b"212\x00\x01" in out             # str -> STR_I


def test_encode_string_table_and_literal_public_id():
    msg = sample()
    plain = _wbxml.encode(msg)
    tabled = _wbxml.encode(msg, string_table=True)
    assert len(tabled) < len(plain) and b"\x83" in tabled and tabled[4] > 0
    assert _wbxml.decode(tabled) == msg
    lit = _wbxml.encode(msg, public_id="-//SYNCML//DTD SyncML 1.2//EN")
    assert lit[:5] == b"\x03\x00\x00\x6a\x1e" and _wbxml.decode(lit) == msg
    both = _wbxml.encode(msg, public_id="-//SYNCML//DTD SyncML 1.2//EN", string_table=True)
    assert _wbxml.decode(both) == msg
    assert _wbxml.decode(_wbxml.encode(msg, version=0)) == msg
    assert _wbxml.encode(msg, public_id=0x0FD3)[1:3] == b"\x9f\x53"


TNDS = Meta(type="application/vnd.syncml.dmtnds+xml")
DDF = "syncml:dmddf1.2"
DEVINF = Meta(type="application/vnd.syncml-devinf+wbxml")


@pytest.mark.parametrize("msg, reason", [
    ("not a message", "cannot encode str"),
    (Message(commands=[Command(name="Sync")]), "unknown command name 'Sync'"),
    (Message(commands=["x"]), "SyncBody entry of type str"),
    (Message(commands=[Command(name="Get", items=["x"])]), "item of type str"),
    (Message(commands=[Command(name="Atomic", commands=[Command(name="Status")])]), "Status inside Atomic"),
    (Message(commands=[Command(name="Alert", data=3)]), "cannot encode Data of type int"),
    (Message(commands=[Command(name="Get", meta=Meta(extra=[("Format", "x")]))]), "not an extra MetInf"),
    (Message(commands=[Command(name="Get", meta=Meta(extra=[("Bogus", "x")]))]), "not an extra MetInf"),
    (Message(commands=[Command(name="Get", meta=Meta(extra=["x"]))]), "not a (name, value) pair"),
    (Message(commands=[Command(name="Get", meta=Meta(extra=[("Mem", 3)]))]), "must be str or list"),
    (Message(commands=[Command(name="Get", items=[Item(meta=TNDS, data=Element(tag="Bogus", xmlns=DDF))])]),
     "not in the DM DDF"),
    (Message(commands=[Command(name="Get", items=[Item(meta=TNDS, data=Element(tag="MgmtTree"))])]),
     "root has namespace None"),
    (Message(commands=[Command(name="Get", items=[Item(meta=TNDS, data=Element(tag="Node", xmlns="x"))])]),
     "namespace 'x'"),
    (Message(commands=[Command(name="Get", items=[Item(meta=DEVINF, data=Element(tag="Node", xmlns="syncml:devinf"))])]),
     "not in the DevInf code page"),
    # a tree travels only in Item Data, under a Meta Type that announces it (else the decoder
    # would hand back bytes)
    (Message(commands=[Command(name="Get", items=[Item(data=Element(tag="MgmtTree", xmlns=DDF))])]),
     "under Meta Type None"),
    (Message(commands=[Command(name="Get", meta=Meta(type="text/plain"), items=[
        Item(data=Element(tag="MgmtTree", xmlns=DDF))])]), "under Meta Type 'text/plain'"),
    (Message(commands=[Command(name="Get", items=[Item(meta=TNDS, data=Element(tag="DevInf", xmlns="syncml:devinf"))])]),
     "under Meta Type"),
    (Message(commands=[Command(name="Alert", data=Element(tag="MgmtTree"))]), "Element Data outside an Item"),
    (Message(commands=[Command(name="Get", items=[Item(meta=TNDS, data=Element(
        tag="MgmtTree", xmlns=DDF, children=[Element(tag="Node", xmlns="syncml:metinf")]))])]),
     "in namespace 'syncml:metinf' inside"),
    (Message(hdr=SyncHdr(cred=Cred(data=Element(tag="MgmtTree")))), "Element Data outside an Item"),
    (Message(commands=[Command(name="Status", target_refs=[1])]), "cannot encode the message"),
])
def test_encode_rejections(msg, reason):
    with pytest.raises(CodecError) as ei:
        _wbxml.encode(msg)
    assert reason in str(ei.value)


def test_encode_options_rejected():
    with pytest.raises(CodecError):
        _wbxml.encode(sample(), version=4)
    with pytest.raises(CodecError):
        _wbxml.encode(sample(), public_id=0x0A)
    with pytest.raises(CodecError):
        _wbxml.encode(sample(), public_id="-//WAPFORUM//DTD WML 1.3//EN")


def test_encode_cyclic_model_is_refused():
    seq = Command(name="Sequence", cmd_id="1")
    seq.commands = [seq]
    with pytest.raises(CodecError, match="nested deeper"):
        _wbxml.encode(Message(commands=[seq]))


# --- property: random messages round-trip ---------------------------------------------

# Two generators: the strategies shared with the XML codec's tests (tests/strategies.py), and
# a WBXML-only one below that also produces what XML cannot carry (C0 controls, NUL in text,
# Meta.extra, TNDS trees, binary Data everywhere Data may be bytes).
import strategies as shared_strategies  # noqa: E402

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_opt = st.none() | _text
_bin = st.binary(max_size=20).map(lambda b: b"\xff" + b)   # never valid UTF-8
_metas = st.none() | st.builds(
    Meta, format=_opt, type=_opt, mark=_opt, size=_opt, max_msg_size=_opt, max_obj_size=_opt,
    next_nonce=_opt, version=_opt,
    extra=st.none() | st.lists(st.tuples(st.sampled_from(["EMI", "FreeID", "Last", "Next", "FieldLevel"]), _text)
                               | st.tuples(st.sampled_from(["Mem", "Anchor"]),
                                           st.lists(st.tuples(st.sampled_from(["FreeMem", "SharedMem", "Last"]), _text),
                                                    min_size=1, max_size=3)),
                               min_size=1, max_size=3))
_ddf_tags = sorted(__import__("dmengine._tokens", fromlist=["PAGES"]).PAGES["dmddf"][2][1].values())
_leaf = st.builds(Element, tag=st.sampled_from(_ddf_tags), text=st.none() | _text.filter(bool))
_tree = st.recursive(_leaf, lambda kids: st.builds(Element, tag=st.sampled_from(_ddf_tags),
                                                    children=st.lists(kids, min_size=1, max_size=3)), max_leaves=6)


def _with_ns(el: Element) -> Element:
    el.xmlns = "syncml:dmddf1.2"
    return el


_items = st.builds(Item, target=_opt, target_name=_opt, source=_opt, source_name=_opt,
                   target_parent=_opt, source_parent=_opt, meta=_metas,
                   data=st.none() | _text | _bin, more_data=st.booleans())
_devinf_tags = sorted(__import__("dmengine._tokens", fromlist=["PAGES"]).PAGES["devinf"][0][1].values())
_devinf_tree = st.builds(Element, tag=st.just("DevInf"), xmlns=st.just("syncml:devinf"),
                         children=st.none() | st.lists(st.builds(Element, tag=st.sampled_from(_devinf_tags),
                                                                 text=st.none() | _text.filter(bool)),
                                                       min_size=1, max_size=4))
_tnds_items = st.builds(Item, target=_opt, meta=st.just(Meta(type="application/vnd.syncml.dmtnds+wbxml")),
                        data=_tree.map(_with_ns)) | st.builds(
    Item, source=_opt, meta=st.just(Meta(type="application/vnd.syncml-devinf+wbxml")), data=_devinf_tree)
_refs = st.none() | st.lists(_text, min_size=1, max_size=3)
_simple = st.builds(
    Command, name=st.sampled_from(["Add", "Alert", "Copy", "Delete", "Exec", "Get", "Replace", "Status", "Results"]),
    cmd_id=_opt, no_resp=st.booleans(), msg_ref=_opt, cmd_ref=_opt, cmd=_opt, target_refs=_refs,
    source_refs=_refs, cred=st.none() | st.builds(Cred, meta=_metas, data=st.none() | _text | _bin),
    chal=st.none() | st.builds(Chal, meta=_metas), meta=_metas, data=st.none() | _text | _bin,
    correlator=_opt, items=st.none() | st.lists(_items | _tnds_items, min_size=1, max_size=3))
_in_container = _simple.filter(lambda c: c.name not in ("Status", "Results"))
_commands = _simple | st.recursive(_in_container, lambda kids: st.builds(
    Command, name=st.sampled_from(["Atomic", "Sequence"]), cmd_id=_opt, meta=_metas,
    commands=st.none() | st.lists(kids, min_size=1, max_size=3)), max_leaves=8)
_own_messages = st.builds(
    Message,
    hdr=st.builds(SyncHdr, ver_dtd=_opt, ver_proto=_opt, session_id=_opt, msg_id=_opt, target=_opt,
                  target_name=_opt, source=_opt, source_name=_opt, resp_uri=_opt, no_resp=st.booleans(),
                  cred=st.none() | st.builds(Cred, meta=_metas, data=st.none() | _text), meta=_metas),
    commands=st.lists(_commands, max_size=4), final=st.booleans())


def normalise(obj):
    """What WBXML cannot tell apart: OPAQUE bytes that are valid UTF-8 come back as str."""
    if isinstance(obj, (bytes, bytearray)):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return bytes(obj)
    if isinstance(obj, list):
        return [normalise(x) for x in obj]
    if isinstance(obj, tuple):
        return tuple(normalise(x) for x in obj)
    if hasattr(obj, "astuple") and not isinstance(obj, type):
        return (type(obj).__name__,) + normalise(obj.astuple())
    return obj


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_own_messages)
def test_property_round_trip(msg):
    out = _wbxml.encode(msg)
    assert normalise(_wbxml.decode(out)) == normalise(msg)
    assert normalise(_wbxml.decode(_wbxml.encode(msg, string_table=True))) == normalise(msg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shared_strategies.messages(binary=True))
def test_property_round_trip_shared_strategy(msg):
    assert _wbxml.decode(_wbxml.encode(msg)) == msg         # binary Data there is never UTF-8
    assert _wbxml.decode(_wbxml.encode(msg, string_table=True)) == msg


# --- the stub matches the module ---------------------------------------------------------


def test_pyi_matches_module():
    pyi = pathlib.Path(_wbxml.__file__).with_name("_wbxml.pyi")
    tree = ast.parse(pyi.read_text())
    declared = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            declared[node.name] = node
        elif isinstance(node, ast.AnnAssign):
            declared[node.target.id] = node
    for name, node in declared.items():
        assert hasattr(_wbxml, name), f"_wbxml.pyi declares {name}, the module lacks it"
        if isinstance(node, ast.FunctionDef):
            params = [a.arg for a in node.args.args] + [a.arg for a in node.args.kwonlyargs]
            assert params == list(inspect.signature(getattr(_wbxml, name)).parameters), name
    public = {n for n, v in vars(_wbxml).items()
              if not n.startswith("_") and (callable(v) and getattr(v, "__module__", None) == "dmengine._wbxml"
                                            or n.isupper())}
    assert public <= set(declared), f"missing from _wbxml.pyi: {sorted(public - set(declared))}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shared_strategies.messages(binary=False))
def test_property_across_codecs(msg):
    """XML and WBXML of one random message give equal models, also when chained."""
    from dmengine import xmlcodec
    via_wbxml = _wbxml.decode(_wbxml.encode(msg))
    via_xml = xmlcodec.decode(xmlcodec.encode(msg))
    assert via_wbxml == via_xml == msg
    assert xmlcodec.decode(xmlcodec.encode(via_wbxml)) == msg
    assert _wbxml.decode(_wbxml.encode(via_xml, string_table=True)) == msg
