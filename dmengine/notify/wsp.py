"""Package #0 as a connectionless WAP push over SMS (PROTOCOL.md §8.4, REAL-PARTS.md).

Sending side (the gateway)::

    UDH   06 05 04 0B 84 23 F0      UDHL 6, IE 05 (16-bit ports) len 4, dst 2948, src 9200
    body  <tid> 06 03 C4 AF 87 <package #0>
          06 Push PDU, 03 headers length,
          C4 content type 0x44 (application/vnd.syncml.notification),
          AF 87 X-Wap-Application-Id (0x2F) = 0x07 (x-wap-application:syncml.dm)

Receiving side (the device simulator): ``parse_udh`` and ``parse_push`` decode what arrives,
including the textual forms of the content type and application id some gateways write, and
``decode_sms_notification`` returns the package #0 bytes after checking port, type and app id.
Everything raises ``CodecError`` (with the offset) on bad bytes; nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dmengine.errors import CodecError

__all__ = [
    "WDP_UDH",
    "PUSH_PORT",
    "WAP_SOURCE_PORT",
    "PDU_PUSH",
    "PDU_CONFIRMED_PUSH",
    "CT_SYNCML_NOTIFICATION",
    "CT_SYNCML_NOTIFICATION_TEXT",
    "APP_ID_SYNCML_DM",
    "APP_ID_SYNCML_DM_TEXT",
    "PUSH_HEADERS",
    "SMS_MAX_USER_DATA",
    "MAX_PUSH_BODY",
    "MAX_PKG0_IN_ONE_SMS",
    "Udh",
    "WspPush",
    "build_push",
    "parse_udh",
    "parse_push",
    "decode_sms_notification",
    "split_user_data",
]

PUSH_PORT = 2948                 # WAP connectionless push (unsecured)
WAP_SOURCE_PORT = 9200
WDP_UDH = bytes.fromhex("0605040B8423F0")
PDU_PUSH = 0x06
PDU_CONFIRMED_PUSH = 0x07
CT_SYNCML_NOTIFICATION = 0x44
CT_SYNCML_NOTIFICATION_TEXT = "application/vnd.syncml.notification"
HDR_X_WAP_APPLICATION_ID = 0x2F
APP_ID_SYNCML_DM = 0x07
APP_ID_SYNCML_DM_TEXT = "x-wap-application:syncml.dm"
# content type C4, then X-Wap-Application-Id AF with value 87
PUSH_HEADERS = bytes((0x80 | CT_SYNCML_NOTIFICATION, 0x80 | HDR_X_WAP_APPLICATION_ID,
                      0x80 | APP_ID_SYNCML_DM))
SMS_MAX_USER_DATA = 140          # 8-bit data: 140 octets, UDH included
MAX_PUSH_BODY = SMS_MAX_USER_DATA - len(WDP_UDH)              # 133: TID + WSP + pkg0
MAX_PKG0_IN_ONE_SMS = MAX_PUSH_BODY - 3 - len(PUSH_HEADERS)   # 127

# Well-known content types (WSP table 40) a receiver may meet; only 0x44 is ours.
_WELL_KNOWN_CT = {0x44: CT_SYNCML_NOTIFICATION_TEXT, 0x03: "text/plain",
                  0x2E: "application/vnd.wap.sic", 0x30: "application/vnd.wap.slc",
                  0x36: "application/vnd.wap.connectivity-wbxml",
                  0x42: "application/vnd.syncml.dm+wbxml", 0x43: "application/vnd.syncml.dm+xml"}
_WELL_KNOWN_APP = {0x07: APP_ID_SYNCML_DM_TEXT, 0x05: "x-wap-application:push.syncml",
                   0x04: "x-wap-application:push.sia", 0x02: "x-wap-application:wml.ua"}


@dataclass(frozen=True, slots=True)
class Udh:
    """Decoded user data header: the information elements, and the ports if present."""

    elements: tuple[tuple[int, bytes], ...]
    dst_port: int | None = None
    src_port: int | None = None
    concat: tuple[int, int, int] | None = None      # (reference, total parts, this part)


@dataclass(frozen=True, slots=True)
class WspPush:
    """A decoded WSP (Confirmed)Push PDU."""

    tid: int
    pdu_type: int
    content_type: str
    content_type_code: int | None          # well-known code, None when sent as text
    app_id: str | None
    app_id_code: int | None                # well-known code, None when sent as text or absent
    headers: bytes                         # the raw headers block (content type included)
    payload: bytes
    other_headers: tuple[tuple[str | int, bytes], ...] = field(default=())


def build_push(pkg0: bytes, tid: int = 1) -> bytes:
    """``<tid> 06 03 C4 AF 87`` + package #0: the SMS body to send with ``WDP_UDH``."""
    if not 0 <= tid <= 0xFF:
        raise CodecError(f"WSP transaction id {tid} not in 0..255")
    return bytes((tid, PDU_PUSH, len(PUSH_HEADERS))) + PUSH_HEADERS + bytes(pkg0)


def split_user_data(user_data: bytes) -> tuple[bytes, bytes]:
    """Split SMS user data that starts with a UDH (UDHI set) into ``(udh, body)``."""
    if not user_data:
        raise CodecError("empty user data", offset=0, expected="UDHL")
    end = 1 + user_data[0]
    if end > len(user_data):
        raise CodecError(f"UDH length {user_data[0]} overruns {len(user_data)} bytes", offset=0)
    return bytes(user_data[:end]), bytes(user_data[end:])


def parse_udh(udh: bytes) -> Udh:
    """Decode a UDH *including* its leading length byte (Kannel's ``udh`` field form)."""
    udh = bytes(udh)
    if not udh:
        raise CodecError("empty UDH", offset=0, expected="UDHL")
    if udh[0] + 1 != len(udh):
        raise CodecError(f"UDHL says {udh[0]} bytes, {len(udh) - 1} present", offset=0)
    pos, elements = 1, []
    dst = src = None
    concat = None
    while pos < len(udh):
        if pos + 2 > len(udh):
            raise CodecError("UDH information element header truncated", offset=pos)
        iei, ln = udh[pos], udh[pos + 1]
        if pos + 2 + ln > len(udh):
            raise CodecError(f"UDH element 0x{iei:02X} length {ln} overruns", offset=pos + 1)
        val = udh[pos + 2:pos + 2 + ln]
        if iei == 0x05:
            if ln != 4:
                raise CodecError("16-bit port element must be 4 bytes", offset=pos + 1)
            dst, src = int.from_bytes(val[:2], "big"), int.from_bytes(val[2:], "big")
        elif iei == 0x04:
            if ln != 2:
                raise CodecError("8-bit port element must be 2 bytes", offset=pos + 1)
            dst, src = val[0], val[1]
        elif iei == 0x00:
            if ln != 3:
                raise CodecError("concatenation element must be 3 bytes", offset=pos + 1)
            concat = (val[0], val[1], val[2])
        elif iei == 0x08:
            if ln != 4:
                raise CodecError("16-bit concatenation element must be 4 bytes", offset=pos + 1)
            concat = (int.from_bytes(val[:2], "big"), val[2], val[3])
        elements.append((iei, val))
        pos += 2 + ln
    return Udh(elements=tuple(elements), dst_port=dst, src_port=src, concat=concat)


def _uintvar(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(5):
        if pos + i >= len(buf):
            raise CodecError("uintvar truncated", offset=pos + i)
        b = buf[pos + i]
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            return value, pos + i + 1
    raise CodecError("uintvar longer than 5 bytes", offset=pos)


def _text(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    nul = buf.find(b"\x00", pos, end)
    if nul < 0:
        raise CodecError("text string without NUL terminator", offset=pos)
    raw = buf[pos:nul]
    if raw[:1] == b"\x7f":          # Quote: text that starts with a byte >= 0x80
        raw = raw[1:]
    return raw.decode("latin-1"), nul + 1


def _field_value(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """Skip one WSP field value (general encoding), returning its raw bytes and the next pos."""
    if pos >= end:
        raise CodecError("header value missing", offset=pos)
    b = buf[pos]
    if b <= 30:
        stop = pos + 1 + b
        start = pos + 1
    elif b == 31:
        ln, start = _uintvar(buf, pos + 1)
        stop = start + ln
    elif b < 128:
        _, stop = _text(buf, pos, end)
        start = pos
    else:
        return buf[pos:pos + 1], pos + 1
    if stop > end:
        raise CodecError("header value length overruns the headers", offset=pos)
    return buf[start:stop], stop


def _content_type(buf: bytes, pos: int, end: int) -> tuple[str, int | None, int]:
    if pos >= end:
        raise CodecError("content type missing", offset=pos, expected="content type")
    b = buf[pos]
    if b >= 0x80:
        code = b & 0x7F
        return _WELL_KNOWN_CT.get(code, f"0x{code:02X}"), code, pos + 1
    if 32 <= b < 128:
        text, nxt = _text(buf, pos, end)
        return text, None, nxt
    # Content-general-form: Value-length Media-type [parameters]
    value, nxt = _field_value(buf, pos, end)
    if not value:
        raise CodecError("empty content-general-form", offset=pos)
    if value[0] >= 0x80:
        code = value[0] & 0x7F
        return _WELL_KNOWN_CT.get(code, f"0x{code:02X}"), code, nxt
    text, _ = _text(value, 0, len(value))
    return text, None, nxt


def _app_id(value: bytes, offset: int) -> tuple[str, int | None]:
    if len(value) == 1 and value[0] >= 0x80:
        code = value[0] & 0x7F
        return _WELL_KNOWN_APP.get(code, f"0x{code:02X}"), code
    if value and value[-1] == 0:
        return value[:-1].decode("latin-1"), None
    if 1 <= len(value) <= 4:                         # long-integer form (already unwrapped)
        code = int.from_bytes(value, "big")
        return _WELL_KNOWN_APP.get(code, f"0x{code:X}"), code
    raise CodecError("X-Wap-Application-Id value not understood", offset=offset)


def parse_push(body: bytes) -> WspPush:
    """Decode a connectionless WSP Push / Confirmed Push PDU (TID first)."""
    body = bytes(body)
    if len(body) < 3:
        raise CodecError(f"WSP push truncated: {len(body)} bytes", offset=len(body),
                         expected="TID, PDU type, headers length")
    tid, pdu = body[0], body[1]
    if pdu not in (PDU_PUSH, PDU_CONFIRMED_PUSH):
        raise CodecError(f"WSP PDU type 0x{pdu:02X} is not Push", offset=1, expected="0x06")
    hlen, hstart = _uintvar(body, 2)
    hend = hstart + hlen
    if hend > len(body):
        raise CodecError(f"WSP headers length {hlen} overruns the PDU", offset=2)
    ct, ct_code, pos = _content_type(body, hstart, hend)
    app_id = None
    app_code = None
    others: list[tuple[str | int, bytes]] = []
    while pos < hend:
        b = body[pos]
        if b >= 0x80:
            name: str | int = b & 0x7F
            vpos = pos + 1
        elif b == 0x7F or b < 32:
            raise CodecError(f"shift/unknown header byte 0x{b:02X}", offset=pos)
        else:
            name, vpos = _text(body, pos, hend)
        value, pos = _field_value(body, vpos, hend)
        if name == HDR_X_WAP_APPLICATION_ID or (isinstance(name, str)
                                                and name.lower() == "x-wap-application-id"):
            app_id, app_code = _app_id(value, vpos)
        else:
            others.append((name, value))
    return WspPush(tid=tid, pdu_type=pdu, content_type=ct, content_type_code=ct_code,
                   app_id=app_id, app_id_code=app_code, headers=body[hstart:hend],
                   payload=body[hend:], other_headers=tuple(others))


def decode_sms_notification(udh: bytes, body: bytes) -> bytes:
    """The package #0 inside one SMS, after checking port 2948, type 0x44 and app id syncml.dm."""
    u = parse_udh(udh)
    if u.dst_port != PUSH_PORT:
        raise CodecError(f"SMS is for port {u.dst_port}, not the WAP push port {PUSH_PORT}",
                         offset=0)
    if u.concat is not None and u.concat[1] != 1:
        raise CodecError("concatenated SMS: reassemble the parts first", offset=0)
    push = parse_push(body)
    if push.content_type != CT_SYNCML_NOTIFICATION_TEXT:
        raise CodecError(f"push content type {push.content_type!r} is not "
                         f"{CT_SYNCML_NOTIFICATION_TEXT}", offset=3)
    if push.app_id is None or push.app_id.lower() != APP_ID_SYNCML_DM_TEXT:
        raise CodecError(f"push application id {push.app_id!r} is not {APP_ID_SYNCML_DM_TEXT}",
                         offset=3)
    return push.payload
