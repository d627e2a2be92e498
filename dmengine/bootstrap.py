"""DM-profile bootstrap messages (L4; PROTOCOL.md §10).

A bootstrap gives a device its DM account: a normal DM message (SyncHdr + Add commands that
create ``./DMAcc/<x>`` with the server address and both credential slots) that MUST be WBXML,
gets no response, and is secured with an HMAC-SHA1 over the WBXML bytes carried in the content
type: ``application/vnd.syncml.dm+wbxml; SEC=<method>; MAC=<hex>``.

Security methods (DM Security 1.2): ``NETWORKID`` (key: the network shared secret — the IMSI
or, for devices without one on record, the IMEI digits), ``USERPIN`` (key: a PIN the user types),
``USERPIN_NETWORKID`` (key ``PIN:secret``).  PROTOCOL.md §12 notes that the per-method key
derivation could not be checked against the spec; this is the reading used here.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from . import _wbxml
from .errors import CodecError
from .message import Command, Item, Message, Meta, SyncHdr

CONTENT_TYPE = "application/vnd.syncml.dm+wbxml"
SECURITY_METHODS = ("NETWORKID", "USERPIN", "USERPIN_NETWORKID", "NONE")
DEFAULT_ACCOUNT_NODE = "./DMAcc/dmengine"


@dataclass(frozen=True, slots=True)
class BootstrapAccount:
    server_id: str
    server_url: str
    client_name: str
    client_password: str
    client_nonce: bytes
    server_password: str
    server_nonce: bytes
    name: str = "dmengine"
    auth_type: str = "DIGEST"


def _leaf(uri: str, value: str | bytes, fmt: str = "chr") -> Command:
    meta = Meta(format=fmt) if fmt != "chr" else None
    return Command(name="Add", items=[Item(target=uri, meta=meta, data=value)])


def _node(uri: str) -> Command:
    return Command(name="Add", items=[Item(target=uri, meta=Meta(format="node"))])


def build_message(acc: BootstrapAccount, dev_id: str, *,
                  node: str = DEFAULT_ACCOUNT_NODE) -> Message:
    """The bootstrap DM message: Adds that create the DMAcc subtree (DM StdObj §9.3)."""
    n = node.rstrip("/")
    cmds = [
        _node(n),
        _leaf(f"{n}/AppID", "w7"),
        _leaf(f"{n}/ServerID", acc.server_id),
        _leaf(f"{n}/Name", acc.name),
        _node(f"{n}/AppAddr"), _node(f"{n}/AppAddr/1"),
        _leaf(f"{n}/AppAddr/1/Addr", acc.server_url),
        _leaf(f"{n}/AppAddr/1/AddrType", "URI"),
        _leaf(f"{n}/AAuthPref", acc.auth_type),
        _node(f"{n}/AppAuth"),
        _node(f"{n}/AppAuth/1"),
        _leaf(f"{n}/AppAuth/1/AAuthLevel", "CLCRED"),
        _leaf(f"{n}/AppAuth/1/AAuthType", acc.auth_type),
        _leaf(f"{n}/AppAuth/1/AAuthName", acc.client_name),
        _leaf(f"{n}/AppAuth/1/AAuthSecret", acc.client_password),
        _leaf(f"{n}/AppAuth/1/AAuthData", acc.client_nonce, "bin"),
        _node(f"{n}/AppAuth/2"),
        _leaf(f"{n}/AppAuth/2/AAuthLevel", "SRVCRED"),
        _leaf(f"{n}/AppAuth/2/AAuthType", acc.auth_type),
        _leaf(f"{n}/AppAuth/2/AAuthName", acc.server_id),
        _leaf(f"{n}/AppAuth/2/AAuthSecret", acc.server_password),
        _leaf(f"{n}/AppAuth/2/AAuthData", acc.server_nonce, "bin"),
    ]
    for i, c in enumerate(cmds, 1):
        c.cmd_id = str(i)
    hdr = SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="0", msg_id="1",
                  target=dev_id, source=acc.server_id)
    return Message(hdr=hdr, commands=cmds, final=True)


def mac_key(method: str, *, network_id: str | None = None, pin: str | None = None) -> bytes:
    if method == "NETWORKID":
        if not network_id:
            raise ValueError("NETWORKID security needs the network shared secret")
        return network_id.encode()
    if method == "USERPIN":
        if not pin:
            raise ValueError("USERPIN security needs the PIN")
        return pin.encode()
    if method == "USERPIN_NETWORKID":
        if not pin or not network_id:
            raise ValueError("USERPIN_NETWORKID security needs the PIN and the network secret")
        return f"{pin}:{network_id}".encode()
    if method == "NONE":
        return b""
    raise ValueError(f"unknown bootstrap security method {method!r}")


def secure(msg: Message, method: str, key: bytes) -> tuple[bytes, str]:
    """Encodes ``msg`` as WBXML and returns ``(body, content_type)`` with SEC and MAC."""
    body = _wbxml.encode(msg)
    if method == "NONE":
        return body, CONTENT_TYPE
    mac = hmac.new(key, body, hashlib.sha1).hexdigest()
    return body, f"{CONTENT_TYPE}; SEC={method}; MAC={mac}"


_PARAM = re.compile(r";\s*([A-Za-z_]+)\s*=\s*\"?([^;\"]*)\"?")


def verify(body: bytes, content_type: str, key: bytes) -> Message:
    """Device side: checks SEC/MAC of a received bootstrap and decodes it (CodecError if the MAC
    is missing or wrong, or the body is not a DM message)."""
    if not content_type.lower().startswith(CONTENT_TYPE):
        raise CodecError(f"bootstrap must be {CONTENT_TYPE}, got {content_type!r}")
    params = {k.upper(): v for k, v in _PARAM.findall(content_type)}
    if params.get("SEC", "NONE") != "NONE":
        want = hmac.new(key, body, hashlib.sha1).hexdigest()
        if not hmac.compare_digest(want, params.get("MAC", "").lower()):
            raise CodecError("bootstrap MAC does not match")
    return _wbxml.decode(body)


__all__ = ["BootstrapAccount", "build_message", "mac_key", "secure", "verify", "CONTENT_TYPE",
           "SECURITY_METHODS"]
