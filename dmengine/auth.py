"""SyncML DM authentication (L2): basic, MD5 digest and HMAC (PROTOCOL.md §7).

Pure functions plus :class:`DmAccount` (what the session needs to know about one device) and
:func:`check_client` (the decision the session makes for one client message).  Every secret
comparison goes through :func:`hmac.compare_digest`.

Wire forms (PROTOCOL.md §7.1, §7.4)::

    basic  Cred/Data = B64(name ":" password)
    md5    Cred/Data = B64(MD5(B64(MD5(name ":" password)) ":" nonce))
    hmac   x-syncml-hmac: algorithm=MD5, username="name",
                          mac=B64(MD5(B64(MD5(name ":" password)) ":" nonce ":" B64(MD5(body))))

``nonce`` is always the raw nonce bytes (NextNonce is their base64).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import os
from hashlib import md5
from typing import Callable

from ._account import DmAccount  # compiled: the session reads it for every package 1
from .errors import AuthError
from .status import StatusCode

__all__ = [
    "AUTH_BASIC", "AUTH_MD5", "AUTH_MAC", "SCHEME_TYPES", "TYPE_SCHEMES", "NONCE_SIZE",
    "RESYNC_NONCE_BYTES", "RESYNC_NONCE_ASCII", "RESYNC_NONCES",
    "DmAccount", "AuthResult", "HmacHeader",
    "md5_key", "md5_digest", "basic_cred", "hmac_mac", "hmac_mac_key", "verify_hmac_key",
    "server_cred_key", "parse_hmac_header", "format_hmac_header",
    "verify_basic", "verify_md5", "verify_md5_key", "verify_hmac", "new_nonce", "nonce_b64", "decode_nonce",
    "check_client", "server_cred",
]

AUTH_BASIC = "syncml:auth-basic"
AUTH_MD5 = "syncml:auth-md5"
AUTH_MAC = "syncml:auth-MAC"
SCHEME_TYPES = {"basic": AUTH_BASIC, "md5": AUTH_MD5, "hmac": AUTH_MAC}
TYPE_SCHEMES = {AUTH_BASIC.lower(): "basic", AUTH_MD5.lower(): "md5", AUTH_MAC.lower(): "hmac"}
NONCE_SIZE = 16                 # RECOMMENDED 16 random octets (PROTOCOL.md §7.2)
# Nonce re-synchronisation (PROTOCOL.md §8.2 and §12.2): the spec's "0x00000000" is read
# either as four zero bytes or as the ten ASCII characters; clients differ.
RESYNC_NONCE_BYTES = b"\x00\x00\x00\x00"
RESYNC_NONCE_ASCII = b"0x00000000"
RESYNC_NONCES = (RESYNC_NONCE_ASCII, RESYNC_NONCE_BYTES)
MAX_HMAC_HEADER = 1024          # longer x-syncml-hmac values are refused outright


def _b(v: str | bytes) -> bytes:
    return v.encode("utf-8") if isinstance(v, str) else v


class AuthResult:
    """Outcome of :func:`check_client`: ``ok``, the SyncHdr ``status`` to answer with, why."""

    __slots__ = ("ok", "status", "scheme", "username", "reason")

    def __init__(self, ok: bool, status: int, scheme: str, username: str | None, reason: str) -> None:
        self.ok = ok
        self.status = status
        self.scheme = scheme
        self.username = username
        self.reason = reason

    def __repr__(self) -> str:
        return (f"AuthResult(ok={self.ok}, status={self.status}, scheme={self.scheme!r}, "
                f"username={self.username!r}, reason={self.reason!r})")


class HmacHeader:
    __slots__ = ("algorithm", "username", "mac")

    def __init__(self, algorithm: str, username: str, mac: str) -> None:
        self.algorithm = algorithm
        self.username = username
        self.mac = mac


# --- computations ----------------------------------------------------------------------


def md5_key(name: str | bytes, secret: str | bytes) -> bytes:
    """``K = B64(MD5(name ":" secret))``: the only thing a verifier needs to keep."""
    return base64.b64encode(md5(_b(name) + b":" + _b(secret)).digest())


def md5_digest(name: str | bytes, secret: str | bytes, nonce: bytes) -> str:
    """``B64(MD5(K ":" nonce))`` — Cred/Data of syncml:auth-md5."""
    return base64.b64encode(md5(md5_key(name, secret) + b":" + nonce).digest()).decode("ascii")


def basic_cred(name: str | bytes, secret: str | bytes) -> str:
    """``B64(name ":" secret)`` — Cred/Data of syncml:auth-basic."""
    return base64.b64encode(_b(name) + b":" + _b(secret)).decode("ascii")


def hmac_mac(name: str | bytes, secret: str | bytes, nonce: bytes, body: bytes) -> str:
    """The ``mac`` of an x-syncml-hmac header over the exact HTTP body."""
    return hmac_mac_key(md5_key(name, secret), nonce, body)


def hmac_mac_key(key: bytes, nonce: bytes, body: bytes) -> str:
    """hmac_mac with ``K`` already known (an account that keeps keys, not passwords)."""
    body_digest = base64.b64encode(md5(body).digest())
    return base64.b64encode(md5(key + b":" + nonce + b":" + body_digest).digest()).decode("ascii")


def format_hmac_header(username: str, mac: str, algorithm: str = "MD5") -> str:
    return f'algorithm={algorithm}, username="{username}", mac={mac}'


def parse_hmac_header(value: str) -> HmacHeader:
    """Parses ``algorithm=MD5, username="name", mac=...``; raises AuthError(401) when malformed."""
    if len(value) > MAX_HMAC_HEADER:
        raise AuthError("x-syncml-hmac header too long")
    params: dict[str, str] = {}
    i, n = 0, len(value)
    while i < n:
        while i < n and value[i] in " \t,":
            i += 1
        if i >= n:
            break
        eq = value.find("=", i)
        if eq < 0:
            raise AuthError(f"x-syncml-hmac: parameter without '=' at {i}")
        key = value[i:eq].strip().lower()
        i = eq + 1
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == '"':
            end = value.find('"', i + 1)
            if end < 0:
                raise AuthError("x-syncml-hmac: unterminated quoted string")
            val = value[i + 1:end]
            i = end + 1
        else:
            end = value.find(",", i)
            end = n if end < 0 else end
            val = value[i:end].strip()
            i = end
        if not key or key in params:
            raise AuthError(f"x-syncml-hmac: empty or repeated parameter {key!r}")
        params[key] = val
    algorithm = params.get("algorithm", "MD5")
    if algorithm.upper() != "MD5":
        raise AuthError(f"x-syncml-hmac: unsupported algorithm {algorithm!r}")
    if "username" not in params or "mac" not in params:
        raise AuthError("x-syncml-hmac: username and mac are required")
    return HmacHeader("MD5", params["username"], params["mac"])


# --- verification (constant time) -----------------------------------------------------


def _eq(a: str | bytes, b: str | bytes) -> bool:
    return hmac.compare_digest(_b(a), _b(b))


def verify_basic(cred_data: str | bytes, username: str, secret: str | bytes) -> bool:
    try:
        raw = base64.b64decode(_b(cred_data).strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return _eq(raw, _b(username) + b":" + _b(secret))


def verify_md5(cred_data: str | bytes, username: str, secret: str | bytes, nonce: bytes) -> bool:
    return _eq(_b(cred_data).strip(), md5_digest(username, secret, nonce).encode("ascii"))


def verify_md5_key(cred_data: str | bytes, key: bytes, nonce: bytes) -> bool:
    """verify_md5 with ``K`` already known (DmAccount.client_key()); one MD5 per check."""
    return _eq(_b(cred_data).strip(), base64.b64encode(md5(key + b":" + nonce).digest()))


def verify_hmac(header: HmacHeader, username: str, secret: str | bytes, nonce: bytes, body: bytes) -> bool:
    return verify_hmac_key(header, username, md5_key(username, secret), nonce, body)


def verify_hmac_key(header: HmacHeader, username: str, key: bytes, nonce: bytes,
                    body: bytes) -> bool:
    """verify_hmac with ``K`` already known (DmAccount.client_key())."""
    name_ok = _eq(header.username, username)
    mac_ok = _eq(header.mac.strip(), hmac_mac_key(key, nonce, body))
    return name_ok & mac_ok


# --- nonces ------------------------------------------------------------------------------


MIN_NONCE_SIZE = 8
MAX_NONCE_SIZE = 64             # nextnonce <= 64 octets (HTTP binding)


def new_nonce(random_bytes: Callable[[int], bytes] = os.urandom, size: int = NONCE_SIZE) -> bytes:
    """``random_bytes(size)``; a source that returns another length between 8 and 64 bytes is
    accepted (tests replay fixed vector nonces such as ``b"dmnonce-0002"``)."""
    n = random_bytes(size)
    if not isinstance(n, bytes) or not MIN_NONCE_SIZE <= len(n) <= MAX_NONCE_SIZE:
        raise ValueError(f"random_bytes({size}) must return {MIN_NONCE_SIZE}..{MAX_NONCE_SIZE} bytes")
    return n


def nonce_b64(nonce: bytes) -> str:
    return base64.b64encode(nonce).decode("ascii")


def decode_nonce(text: str | bytes) -> bytes:
    """NextNonce text → raw bytes; raises AuthError(400-ish 401) on invalid base64."""
    try:
        return base64.b64decode(_b(text).strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuthError(f"NextNonce is not base64: {exc}") from None


# --- the session's decision for one client message ------------------------------------


def check_client(require: str, *, cred_type: str | None, cred_data: str | bytes | None,
                 loc_name: str | None, account: DmAccount | None, nonce: bytes | None,
                 hmac_header: str | None = None, body: bytes | None = None) -> AuthResult:
    """Checks the device's credentials for one message.

    ``require``: "md5" | "basic" | "hmac" | "none".  With "basic" an MD5 Cred is accepted too
    (it is stronger).  ``nonce`` is the nonce the device had to use.  Returns an AuthResult whose
    status is 212 (md5/basic accepted for the session), 200 (hmac: this message only; none),
    401 (wrong) or 407 (missing).
    """
    if require == "none":
        return AuthResult(True, StatusCode.OK, "none", loc_name, "no authentication required")
    username = account.username if account is not None else loc_name
    if require == "hmac":
        if hmac_header is None:
            return AuthResult(False, StatusCode.MISSING_CREDENTIALS, "hmac", username, "no x-syncml-hmac header")
        if body is None:
            return AuthResult(False, StatusCode.INVALID_CREDENTIALS, "hmac", username, "no body to check the HMAC over")
        try:
            hdr = parse_hmac_header(hmac_header)
        except AuthError as exc:
            return AuthResult(False, StatusCode.INVALID_CREDENTIALS, "hmac", username, str(exc))
        if account is None:
            return AuthResult(False, StatusCode.INVALID_CREDENTIALS, "hmac", hdr.username, "unknown device")
        if nonce is None:
            return AuthResult(False, StatusCode.INVALID_CREDENTIALS, "hmac", username, "no nonce issued yet")
        if not verify_hmac_key(hdr, account.username, account.client_key(), nonce, body):
            return AuthResult(False, StatusCode.INVALID_CREDENTIALS, "hmac", hdr.username, "HMAC mismatch")
        return AuthResult(True, StatusCode.OK, "hmac", account.username, "HMAC verified")
    if require not in ("md5", "basic"):
        raise ValueError(f"require_auth must be md5, basic, hmac or none, not {require!r}")
    if cred_data is None or cred_type is None:
        return AuthResult(False, StatusCode.MISSING_CREDENTIALS, require, username, "no Cred in SyncHdr")
    scheme = TYPE_SCHEMES.get(cred_type.strip().lower())
    if scheme is None or scheme == "hmac" or (require == "md5" and scheme != "md5"):
        return AuthResult(False, StatusCode.INVALID_CREDENTIALS, require, username,
                          f"credential type {cred_type!r} not accepted (need {SCHEME_TYPES[require]})")
    if account is None:
        return AuthResult(False, StatusCode.INVALID_CREDENTIALS, scheme, username, "unknown device")
    if loc_name is not None and not _eq(loc_name, account.username):
        return AuthResult(False, StatusCode.INVALID_CREDENTIALS, scheme, loc_name, "user name does not match the account")
    if scheme == "basic":
        if account.client_secret is None:       # an account that keeps only its key
            return AuthResult(False, StatusCode.INVALID_CREDENTIALS, scheme, account.username,
                              "basic needs the password; the account keeps only its key")
        ok = verify_basic(cred_data, account.username, account.client_secret)
    else:
        if nonce is None:
            return AuthResult(False, StatusCode.INVALID_CREDENTIALS, scheme, account.username, "no nonce issued yet")
        ok = verify_md5_key(cred_data, account.client_key(), nonce)
    if not ok:
        return AuthResult(False, StatusCode.INVALID_CREDENTIALS, scheme, account.username,
                          "digest mismatch (wrong secret or stale nonce)" if scheme == "md5" else "wrong password")
    return AuthResult(True, StatusCode.AUTHENTICATION_ACCEPTED, scheme, account.username, "credentials accepted")


def server_cred(server_id: str, server_secret: str | bytes, server_nonce: bytes | None) -> str:
    """Cred/Data of the server's MD5 credentials (nonce given by the device; empty if none yet)."""
    return md5_digest(server_id, server_secret, server_nonce or b"")


def server_cred_key(server_key: bytes, server_nonce: bytes | None) -> str:
    """server_cred with the server's ``K`` instead of its password."""
    return base64.b64encode(md5(server_key + b":" + (server_nonce or b"")).digest()).decode("ascii")
