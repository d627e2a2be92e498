"""Package #0 build/parse (PROTOCOL.md §8, vectors/README.md) and the WAP push framing."""
from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmengine.errors import CodecError, DmError
from dmengine.notify import wsp
from dmengine.notify.pkg0 import (
    RESYNC_NONCE_ASCII,
    RESYNC_NONCE_BYTES,
    Pkg0DigestError,
    build_pkg0,
    build_trigger,
    compute_digest,
    parse_pkg0,
    session_id_text,
)

# The worked example's inputs (vectors/README.md "Package #0 inputs")
SERVER_ID = "acme-dms"
SECRET = "srv-secret-42"
NONCE = bytes.fromhex("0123456789abcdeffedcba9876543210")
SESSION = 0x1A2B


@pytest.fixture(scope="module")
def vector09(vectors_dir) -> bytes:
    return (vectors_dir / "09-pkg0-notification.bin").read_bytes()


def test_vector09_byte_exact(vector09):
    built = build_pkg0(SERVER_ID, SECRET, NONCE, SESSION, ui_mode=2, initiator=1, version=11)
    assert built == vector09
    assert hashlib.sha256(built).hexdigest() == \
        "7d354122744ec7571bc897f2ee33800518a2399b78e46a3991036d6076aa7c23"


def test_vector09_intermediates():
    trigger = build_trigger(SERVER_ID, SESSION, ui_mode=2, initiator=1)
    assert trigger.hex() == "02e80000001a2b0861636d652d646d73"
    assert base64.b64encode(hashlib.md5(b"acme-dms:srv-secret-42").digest()) == \
        b"qIUiuFQooZcVh8cn6FkGFQ=="
    assert base64.b64encode(hashlib.md5(trigger).digest()) == b"aS2SG6WTPoyX5/FMQQwYLQ=="
    assert compute_digest(SERVER_ID, SECRET, NONCE, trigger).hex() == \
        "5993b2dd54f3a7453499cf843793e170"


def test_header_bytes_from_protocol_text():
    # PROTOCOL.md §8.1: version 11, ui 3, initiator 0 -> 02 F0; ui 2, initiator 1 -> 02 E8
    assert build_trigger("x", 1, ui_mode=3, initiator=0)[:2] == b"\x02\xf0"
    assert build_trigger("x", 1, ui_mode=2, initiator=1)[:2] == b"\x02\xe8"


def test_vector09_parses_and_verifies(vector09):
    p = parse_pkg0(vector09, SECRET, NONCE)
    assert p.verified and not p.resync and p.nonce == NONCE
    assert (p.version, p.ui_mode, p.initiator, p.future) == (11, 2, 1, 0)
    assert p.session_id == 0x1A2B and p.session_id_text == "1A2B"
    assert p.server_id == "acme-dms" and p.vendor == b""
    assert p.digest.hex() == "5993b2dd54f3a7453499cf843793e170"
    assert p.server_initiated


def test_parse_without_secret_does_not_verify(vector09):
    p = parse_pkg0(vector09)
    assert not p.verified and p.nonce is None


@pytest.mark.parametrize("secret,nonce", [
    ("srv-secret-43", NONCE),                 # wrong secret
    (SECRET, NONCE[:-1] + b"\x11"),           # wrong nonce
])
def test_wrong_credentials_rejected(vector09, secret, nonce):
    with pytest.raises(Pkg0DigestError) as ei:
        parse_pkg0(vector09, secret, nonce)
    assert isinstance(ei.value, CodecError) and ei.value.offset == 0


def test_tampered_trigger_rejected(vector09):
    bad = bytearray(vector09)
    bad[22] ^= 0x01                            # session id low byte
    with pytest.raises(Pkg0DigestError):
        parse_pkg0(bytes(bad), SECRET, NONCE)


# vectors/README.md: same trigger, digest with the resync nonce
RESYNC_ZERO_BYTES_DIGEST = "a08fa0414a09a9573da3085f445d5516"
RESYNC_ASCII_DIGEST = "ac2271f47321a1e23b5530109daca159"


def test_resync_digests_match_readme():
    trigger = build_trigger(SERVER_ID, SESSION, ui_mode=2, initiator=1)
    assert compute_digest(SERVER_ID, SECRET, RESYNC_NONCE_BYTES, trigger).hex() == \
        RESYNC_ZERO_BYTES_DIGEST
    assert compute_digest(SERVER_ID, SECRET, RESYNC_NONCE_ASCII, trigger).hex() == \
        RESYNC_ASCII_DIGEST


@pytest.mark.parametrize("nonce,digest_hex", [
    (RESYNC_NONCE_BYTES, RESYNC_ZERO_BYTES_DIGEST),
    (RESYNC_NONCE_ASCII, RESYNC_ASCII_DIGEST),
])
def test_resync_nonce_accepted_only_when_asked(nonce, digest_hex):
    msg = build_pkg0(SERVER_ID, SECRET, nonce, SESSION, ui_mode=2, initiator=1)
    assert msg[:16].hex() == digest_hex
    with pytest.raises(Pkg0DigestError):
        parse_pkg0(msg, SECRET, NONCE)                           # stored nonce only
    p = parse_pkg0(msg, SECRET, NONCE, accept_resync=True)
    assert p.resync and p.nonce == nonce and p.session_id == SESSION
    p = parse_pkg0(msg, SECRET, None, accept_resync=True)        # no stored nonce at all
    assert p.resync and p.nonce == nonce


def test_stored_nonce_preferred_over_resync(vector09):
    p = parse_pkg0(vector09, SECRET, NONCE, accept_resync=True)
    assert p.nonce == NONCE and not p.resync


def test_version_12_accepted_others_refused():
    m12 = build_pkg0(SERVER_ID, SECRET, NONCE, SESSION, version=12)
    assert parse_pkg0(m12, SECRET, NONCE).version == 12
    m10 = build_pkg0(SERVER_ID, SECRET, NONCE, SESSION, version=10)
    with pytest.raises(CodecError) as ei:
        parse_pkg0(m10, SECRET, NONCE)
    assert ei.value.offset == 16


def test_bad10_short_rejected(vectors_dir):
    data = (vectors_dir / "bad-10-pkg0-short.bin").read_bytes()
    assert len(data) == 20
    with pytest.raises(CodecError) as ei:
        parse_pkg0(data)
    assert ei.value.offset == 20 and "truncated" in str(ei.value)


def test_bad11_length_overrun_rejected(vectors_dir):
    data = (vectors_dir / "bad-11-pkg0-len-overrun.bin").read_bytes()
    assert data[23] == 200
    with pytest.raises(CodecError) as ei:
        parse_pkg0(data)
    assert ei.value.offset == 23 and "overruns" in str(ei.value)


@pytest.mark.parametrize("data,offset", [
    (b"", 0),
    (b"\x00" * 23, 23),
    (bytes(16) + bytes.fromhex("02e80000001a2b00"), 23),       # empty server id
    (bytes(16) + bytes.fromhex("02e80000001a2b02") + b"\xff\xfe", 24),   # not UTF-8
])
def test_malformed_rejected_with_offset(data, offset):
    with pytest.raises(CodecError) as ei:
        parse_pkg0(data)
    assert ei.value.offset == offset


def test_size_limit():
    msg = build_pkg0(SERVER_ID, SECRET, NONCE, SESSION, vendor=b"v" * 100)
    parse_pkg0(msg)
    with pytest.raises(CodecError):
        parse_pkg0(msg, max_size=64)


@pytest.mark.parametrize("kw", [
    dict(server_id=""), dict(server_id="x" * 256), dict(session_id=0), dict(session_id=0x10000),
    dict(ui_mode=4), dict(initiator=2), dict(version=1024),
])
def test_build_refuses_out_of_range(kw):
    args = dict(server_id=SERVER_ID, session_id=SESSION)
    args.update(kw)
    sid, sess = args.pop("server_id"), args.pop("session_id")
    with pytest.raises(CodecError):
        build_pkg0(sid, SECRET, NONCE, sess, **args)


def test_session_id_text():
    assert session_id_text(0x1A2B) == "1A2B"
    assert session_id_text(0x05F0) == "5F0"
    assert session_id_text(1) == "1"
    assert session_id_text(0xFFFF) == "FFFF"
    with pytest.raises(CodecError):
        session_id_text(0x10000)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    server_id=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                      max_size=60).filter(lambda s: len(s.encode()) <= 255),
    secret=st.binary(max_size=40),
    nonce=st.binary(max_size=32),
    session_id=st.integers(1, 0xFFFF),
    ui_mode=st.integers(0, 3),
    initiator=st.integers(0, 1),
    version=st.sampled_from([11, 12]),
    vendor=st.binary(max_size=64),
)
def test_round_trip(server_id, secret, nonce, session_id, ui_mode, initiator, version, vendor):
    msg = build_pkg0(server_id, secret, nonce, session_id, ui_mode=ui_mode, initiator=initiator,
                     version=version, vendor=vendor)
    p = parse_pkg0(msg, secret, nonce)
    assert (p.server_id, p.session_id, p.ui_mode, p.initiator, p.version, p.vendor, p.future) == \
        (server_id, session_id, ui_mode, initiator, version, vendor, 0)
    assert p.nonce == nonce and p.trigger == msg[16:]
    assert p.session_id_text == format(session_id, "X")
    # through the WAP push framing and back
    body = wsp.build_push(msg, tid=session_id & 0xFF)
    assert wsp.decode_sms_notification(wsp.WDP_UDH, body) == msg


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_parse_never_crashes(data):
    try:
        parse_pkg0(data, SECRET, NONCE, accept_resync=True)
    except DmError as exc:
        assert isinstance(exc, CodecError)


# --- WAP push framing --------------------------------------------------------------------

def test_push_bytes(vector09):
    body = wsp.build_push(vector09, tid=1)
    assert body[:6] == bytes.fromhex("010603C4AF87")
    assert body[6:] == vector09
    assert wsp.WDP_UDH == bytes.fromhex("0605040B8423F0")
    u = wsp.parse_udh(wsp.WDP_UDH)
    assert (u.dst_port, u.src_port) == (2948, 9200)
    push = wsp.parse_push(body)
    assert push.tid == 1 and push.pdu_type == 6
    assert push.content_type_code == 0x44 and push.app_id_code == 0x07
    assert push.payload == vector09


def test_push_textual_forms_decoded(vector09):
    # content type and app id as text strings, plus an unrelated header (X-Wap-Initiator-URI 0x37)
    headers = (b"application/vnd.syncml.notification\x00"
               b"\xaf" + b"x-wap-application:syncml.dm\x00"
               b"\xb7" + b"http://dm.example\x00")
    body = bytes((9, 6, len(headers))) + headers + vector09
    push = wsp.parse_push(body)
    assert push.content_type == "application/vnd.syncml.notification"
    assert push.content_type_code is None and push.app_id == "x-wap-application:syncml.dm"
    assert push.other_headers == ((0x37, b"http://dm.example\x00"),)
    assert wsp.decode_sms_notification(wsp.WDP_UDH, body) == vector09


@pytest.mark.parametrize("udh,body,why", [
    (bytes.fromhex("0605040B8523F0"), bytes.fromhex("010603C4AF87") + b"x", "port"),
    (wsp.WDP_UDH, bytes.fromhex("010603C3AF87") + b"x", "content type"),
    (wsp.WDP_UDH, bytes.fromhex("010603C4AF85") + b"x", "application id"),
    (wsp.WDP_UDH, bytes.fromhex("010803C4AF87") + b"x", "Push"),
    (wsp.WDP_UDH, bytes.fromhex("010609C4AF87"), "overruns"),
    (bytes.fromhex("0705040B8423F0"), bytes.fromhex("010603C4AF87"), "UDHL"),
])
def test_push_rejections(udh, body, why):
    with pytest.raises(CodecError) as ei:
        wsp.decode_sms_notification(udh, body)
    assert why in str(ei.value)


def test_one_sms_capacity():
    assert wsp.MAX_PUSH_BODY == 133 and wsp.MAX_PKG0_IN_ONE_SMS == 127


@settings(deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=12))
def test_push_parser_never_crashes(body, udh):
    for fn in (lambda: wsp.parse_push(body), lambda: wsp.parse_udh(udh),
               lambda: wsp.decode_sms_notification(udh, body)):
        try:
            fn()
        except CodecError:
            pass
