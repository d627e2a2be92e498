"""OMA DM 1.2 General Package #0: the server-alerted notification (PROTOCOL.md §8).

Layout, big-endian::

    digest       16 bytes  MD5(B64(MD5(server-id ":" secret)) ":" nonce ":" B64(MD5(trigger)))
    trigger      = header || server-id || vendor
      version    10 bits   11 (accept 11 and 12)
      ui-mode     2 bits   0 not specified, 1 background, 2 informative, 3 user interaction
      initiator   1 bit    0 client/user, 1 server
      future     27 bits   0
      sessionid  16 bits   1..0xFFFF, the client writes it as upper-case hex in pkg #1 SessionID
      length      8 bits   N = length of server-id
      server-id   N bytes
      vendor     the rest  vendor-specific trigger body (optional)

``secret`` and ``nonce`` are the *server* credentials the device holds (DMAcc SRVCRED
AAuthSecret / AAuthData).  The nonce is raw bytes (base64-decoded NextNonce).

Building and parsing are pure: no I/O, no clocks.  Bad bytes raise ``CodecError`` with the
offset where parsing stopped; a digest that matches none of the allowed nonces raises
``Pkg0DigestError`` (a ``CodecError`` at offset 0).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from dmengine.auth import RESYNC_NONCE_ASCII, RESYNC_NONCE_BYTES  # (the session accepts them too)
from dmengine.errors import CodecError

__all__ = [
    "DIGEST_LEN",
    "HEADER_LEN",
    "MIN_PKG0_LEN",
    "DEFAULT_MAX_PKG0_SIZE",
    "DEFAULT_VERSION",
    "ACCEPTED_VERSIONS",
    "RESYNC_NONCE_BYTES",
    "RESYNC_NONCE_ASCII",
    "UI_NOT_SPECIFIED",
    "UI_BACKGROUND",
    "UI_INFORMATIVE",
    "UI_USER_INTERACTION",
    "Pkg0",
    "Pkg0DigestError",
    "build_trigger",
    "build_pkg0",
    "compute_digest",
    "parse_pkg0",
    "session_id_text",
]

DIGEST_LEN = 16
HEADER_LEN = 8                                   # 64-bit header word, incl. the length byte
MIN_PKG0_LEN = DIGEST_LEN + HEADER_LEN + 1       # at least a one-byte server id
DEFAULT_MAX_PKG0_SIZE = 4096                     # far above one SMS (127 bytes); a parse limit
DEFAULT_VERSION = 11
ACCEPTED_VERSIONS: tuple[int, ...] = (11, 12)    # PROTOCOL.md §12.1: send 11, accept 11 and 12
MAX_SESSION_ID = 0xFFFF
MAX_SERVER_ID_LEN = 0xFF


UI_NOT_SPECIFIED = 0
UI_BACKGROUND = 1
UI_INFORMATIVE = 2
UI_USER_INTERACTION = 3


class Pkg0DigestError(CodecError):
    """The package #0 digest matches none of the nonces tried (wrong secret, nonce or bytes)."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, offset=0, expected="digest over the trigger")


@dataclass(frozen=True, slots=True)
class Pkg0:
    """One decoded package #0.

    ``nonce`` is the nonce whose digest matched (None when no secret was given, so nothing
    was verified); ``resync`` is True when it was one of the re-synchronisation nonces.
    """

    digest: bytes
    version: int
    ui_mode: int
    initiator: int
    future: int
    session_id: int
    server_id: str
    vendor: bytes
    trigger: bytes
    nonce: bytes | None = None
    resync: bool = False

    @property
    def verified(self) -> bool:
        return self.nonce is not None

    @property
    def session_id_text(self) -> str:
        return session_id_text(self.session_id)

    @property
    def server_initiated(self) -> bool:
        return self.initiator == 1


def session_id_text(session_id: int) -> str:
    """The SessionID the device writes in pkg #1: upper-case hex, no leading zeros."""
    if not 0 <= session_id <= MAX_SESSION_ID:
        raise CodecError(f"session id {session_id} out of range 0..0xFFFF")
    return format(session_id, "X")


def _b64md5(data: bytes) -> bytes:
    return base64.b64encode(hashlib.md5(data).digest())


def _as_bytes(value: str | bytes, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise CodecError(f"{what} must be str or bytes, not {type(value).__name__}")


def compute_digest(server_id: str | bytes, server_secret: str | bytes, nonce: bytes,
                   trigger: bytes) -> bytes:
    """``MD5(B64(MD5(server_id ":" secret)) ":" nonce ":" B64(MD5(trigger)))``, raw 16 bytes."""
    key = _b64md5(_as_bytes(server_id, "server_id") + b":"
                  + _as_bytes(server_secret, "server_secret"))
    return compute_digest_key(key, nonce, trigger)


def compute_digest_key(server_key: bytes, nonce: bytes, trigger: bytes) -> bytes:
    """compute_digest with ``K = B64(MD5(server_id ":" secret))`` given (an account that
    keeps the key, not the password)."""
    return hashlib.md5(_as_bytes(server_key, "server_key") + b":" + _as_bytes(nonce, "nonce")
                       + b":" + _b64md5(trigger)).digest()


def build_trigger(server_id: str | bytes, session_id: int, *, ui_mode: int = UI_NOT_SPECIFIED,
                  initiator: int = 1, version: int = DEFAULT_VERSION, vendor: bytes = b"") -> bytes:
    """Header word + server id + vendor part (everything after the digest)."""
    sid = _as_bytes(server_id, "server_id")
    if not 1 <= len(sid) <= MAX_SERVER_ID_LEN:
        raise CodecError(f"server id must be 1..255 bytes, got {len(sid)}")
    if not 0 <= version < 1 << 10:
        raise CodecError(f"version {version} does not fit 10 bits")
    if ui_mode not in (0, 1, 2, 3):
        raise CodecError(f"ui-mode {ui_mode} not in 0..3")
    if initiator not in (0, 1):
        raise CodecError(f"initiator {initiator} not 0 or 1")
    if not 1 <= session_id <= MAX_SESSION_ID:
        raise CodecError(f"session id {session_id} out of range 1..0xFFFF")
    hi = (version << 30) | (ui_mode << 28) | (initiator << 27)      # 40 bits, future-use 0
    header = hi.to_bytes(5, "big") + session_id.to_bytes(2, "big") + bytes((len(sid),))
    return header + sid + _as_bytes(vendor, "vendor")


def build_pkg0(server_id: str | bytes, server_secret: str | bytes | None, server_nonce: bytes,
               session_id: int, *, ui_mode: int = UI_NOT_SPECIFIED, initiator: int = 1,
               version: int = DEFAULT_VERSION, vendor: bytes = b"",
               server_key: bytes | None = None) -> bytes:
    """The whole package #0: digest followed by the trigger.  The digest is made with
    ``server_key`` when the secret is None."""
    trigger = build_trigger(server_id, session_id, ui_mode=ui_mode, initiator=initiator,
                            version=version, vendor=vendor)
    if server_secret is None:
        if server_key is None:
            raise CodecError("package #0 needs the server secret or the server key")
        return compute_digest_key(server_key, server_nonce, trigger) + trigger
    return compute_digest(server_id, server_secret, server_nonce, trigger) + trigger


def parse_pkg0(data: bytes, server_secret: str | bytes | None = None,
               server_nonce: bytes | None = None, *, accept_resync: bool = False,
               versions: tuple[int, ...] = ACCEPTED_VERSIONS,
               max_size: int = DEFAULT_MAX_PKG0_SIZE) -> Pkg0:
    """Decode package #0 and, when ``server_secret`` is given, verify its digest.

    The digest is checked against ``server_nonce`` first; with ``accept_resync`` also against
    both readings of the re-synchronisation nonce (four zero bytes, then the ASCII string
    ``0x00000000``).  The nonce that matched is returned in ``Pkg0.nonce``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"package #0 must be bytes, not {type(data).__name__}")
    data = bytes(data)
    n = len(data)
    if n > max_size:
        raise CodecError(f"package #0 is {n} bytes, limit {max_size}", offset=max_size)
    if n < DIGEST_LEN + HEADER_LEN:
        raise CodecError(f"package #0 truncated: {n} bytes, need at least "
                         f"{DIGEST_LEN + HEADER_LEN}",
                         offset=n, expected="16-byte digest and 8-byte header")
    digest = data[:DIGEST_LEN]
    hi = int.from_bytes(data[16:21], "big")
    version = hi >> 30
    if version not in versions:
        raise CodecError(f"package #0 version {version} not supported (accepted: "
                         f"{', '.join(map(str, versions))})", offset=16,
                         expected="version 11 or 12")
    ui_mode = (hi >> 28) & 3
    initiator = (hi >> 27) & 1
    future = hi & ((1 << 27) - 1)
    session_id = int.from_bytes(data[21:23], "big")
    sid_len = data[23]
    if sid_len == 0:
        raise CodecError("package #0 server identifier is empty", offset=23,
                         expected="length-identifier >= 1")
    end = 24 + sid_len
    if end > n:
        raise CodecError(f"package #0 server identifier length {sid_len} overruns the message "
                         f"({n - 24} bytes left)", offset=23, expected=f"<= {n - 24}")
    sid_raw = data[24:end]
    try:
        server_id = sid_raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CodecError(f"package #0 server identifier is not UTF-8: {exc.reason}",
                         offset=24 + exc.start) from None
    trigger = data[DIGEST_LEN:]
    matched: bytes | None = None
    resync = False
    if server_secret is not None:
        candidates: list[tuple[bytes, bool]] = []
        if server_nonce is not None:
            candidates.append((_as_bytes(server_nonce, "server_nonce"), False))
        if accept_resync:
            candidates += [(RESYNC_NONCE_BYTES, True), (RESYNC_NONCE_ASCII, True)]
        if not candidates:
            raise CodecError("a server secret was given without a nonce and resync is off")
        for nonce, is_resync in candidates:
            want = compute_digest(sid_raw, server_secret, nonce, trigger)
            if hmac.compare_digest(want, digest):
                matched, resync = nonce, is_resync
                break
        else:
            tried = "stored nonce" if server_nonce is not None else ""
            if accept_resync:
                tried = (tried + " and " if tried else "") + "both resync nonces"
            raise Pkg0DigestError(f"package #0 digest does not verify for server "
                                  f"{server_id!r} ({tried} tried)")
    return Pkg0(digest=digest, version=version, ui_mode=ui_mode, initiator=initiator,
                future=future, session_id=session_id, server_id=server_id,
                vendor=data[end:], trigger=trigger, nonce=matched, resync=resync)
