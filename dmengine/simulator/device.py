"""One virtual OMA DM device: a compact management tree and a sans-IO DM client engine.

The device answers server messages the way a phone does (PROTOCOL.md §3–§7, §9):

* package 1 with ``./DevInfo`` in a Replace and Alert 1201 (or 1200 with the SessionID of a
  package 0), MD5 / basic / HMAC credentials, re-sent with the new nonce after a challenge;
* Status (and Results) for Get, Replace, Add, Delete, Exec, Copy, Atomic, Sequence with the
  codes of DM RepPro (404 missing node, 405 not allowed, 418 exists, 507/216 in a failed
  Atomic, 215 after a "No" in a Sequence, …); UI alerts answered per the ``DeviceProfile``;
* multi-message packages (Alert 1222) and large objects both ways (MoreData, 213, 424, 1225);
* RespURI followed; XML or WBXML;
* FUMO: an Exec on Download / Update / DownloadAndUpdate is answered 202 and becomes a ``Job``
  that the I/O layer (``fleet.py``) runs (HTTP download, size check); the result goes back in
  a Generic Alert 1226 with the Exec's Correlator, in the same session or a later one.

No I/O here: ``ClientSession.first()`` / ``next()`` give the bytes to POST and
``ClientSession.receive(body)`` takes the server's reply.  The tree is a class-wide template
plus a small per-device overlay, so thousands of devices fit in little memory.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
from binascii import a2b_base64, b2a_base64
from hashlib import md5
from typing import Any, Callable

from .. import auth
from ..errors import CodecError, DmError
from ._client import CODECS as _CODECS
from ._client import CONTENT_TYPES, MAX_AUTH_ATTEMPTS, ClientBase
from ._client import Outgoing as _Outgoing
from ._client import Template as _Template
from ._client import base_headers as _base_headers
from ._client import codec as _codec
from ._client import status as _status
from ..message import Chal, Command, Cred, Item, Message, Meta, SyncHdr
from ..status import AlertCode, FumoResult, FumoState, StatusCode

__all__ = ["DeviceProfile", "FaultPlan", "VirtualDevice", "ClientSession", "Job",
           "CONTENT_TYPES", "FUMO_ALERT_TYPES", "SimulatorError"]


FUMO_ROOT = "./FUMO/1"
FUMO_ALERT_TYPES = {
    "download": "org.openmobilealliance.dm.firmwareupdate.download",
    "update": "org.openmobilealliance.dm.firmwareupdate.update",
    "downloadandupdate": "org.openmobilealliance.dm.firmwareupdate.downloadandupdate",
}

DEFAULT_MAX_MSG_SIZE = 16 * 1024       # what the device advertises
DEFAULT_MAX_OBJ_SIZE = 1024 * 1024


class SimulatorError(DmError):
    """The server's message made the virtual device give up the session."""


# --- configuration ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class FaultPlan:
    """Faults one device shows (the fleet assigns them by share)."""

    timeout: bool = False          # stops answering after package 1
    drop: bool = False             # drops the connection once mid-session, then resends
    wrong_credentials: bool = False
    decline_optin: bool = False    # answers "No" (304) to every confirm alert
    fail_update: int | None = None  # FUMO result code of the update (e.g. 410)


@dataclasses.dataclass(slots=True)
class DeviceProfile:
    """Behaviour shared by a fleet (one object for all devices)."""

    server_url: str = "http://127.0.0.1:8080/dm"
    server_id: str = "dmengine"
    encoding: str = "wbxml"
    auth: str = "md5"                        # md5 | basic | hmac | none
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE
    max_obj_size: int = DEFAULT_MAX_OBJ_SIZE
    man: str = "Acme"
    mod: str = "EX100"
    fwv: str = "2.3.9"
    lang: str = "en-US"
    ui_answer: str = "accept"                # accept | decline | cancel | timeout | unsupported
    text_answer: str = "ok"
    report_in_same_session: bool = True      # FUMO 1226 in the session of the Exec, else later
    verify_server: bool = False              # check the server's Cred when it sends one
    resync: bool = True                      # follow a package #0 signed with the resync nonce
    user_agent: str = "dmengine-sim/1.0"


# --- the management tree -------------------------------------------------------------------------

class _Attr:
    """A template value read from the device (DevId, FwV, …)."""
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


# path -> (format, acl, type, value); acl letters: G get, R replace, A add child, D delete, E exec
_T: dict[str, tuple[str, str, str | None, Any]] = {}


def _n(path: str, fmt: str = "node", acl: str = "G", typ: str | None = None,
       value: Any = None) -> None:
    _T[path] = (fmt, acl, typ, value)


_n(".", acl="GA")
_n("./DevInfo", typ="urn:oma:mo:oma-dm-devinfo:1.0")
_n("./DevInfo/DevId", "chr", value=_Attr("dev_id"))
_n("./DevInfo/Man", "chr", value=_Attr("man"))
_n("./DevInfo/Mod", "chr", value=_Attr("mod"))
_n("./DevInfo/DmV", "chr", value="1.2")
_n("./DevInfo/Lang", "chr", value=_Attr("lang"))
_n("./DevDetail", typ="urn:oma:mo:oma-dm-devdetail:1.0")
_n("./DevDetail/DevTyp", "chr", value="phone")
_n("./DevDetail/OEM", "chr", value=_Attr("man"))
_n("./DevDetail/FwV", "chr", value=_Attr("fwv"))
_n("./DevDetail/SwV", "chr", value=_Attr("swv"))
_n("./DevDetail/HwV", "chr", value="1.0")
_n("./DevDetail/LrgObj", "bool", value="true")
_n("./DevDetail/URI")
_n("./DevDetail/URI/MaxDepth", "int", value="0")
_n("./DevDetail/URI/MaxTotLen", "int", value="0")
_n("./DevDetail/URI/MaxSegLen", "int", value="0")
_n("./DMAcc", acl="GA")
_n("./DMAcc/1", acl="GA", typ="org.openmobilealliance/1.0/w7")
_n("./DMAcc/1/AppID", "chr", "GR", value="w7")
_n("./DMAcc/1/ServerID", "chr", "GR", value=_Attr("server_id"))
_n("./DMAcc/1/Name", "chr", "GR", value="dmengine")
_n("./DMAcc/1/AppAddr", acl="GA")
_n("./DMAcc/1/AppAddr/1", acl="GA")
_n("./DMAcc/1/AppAddr/1/Addr", "chr", "GR", value=_Attr("server_url"))
_n("./DMAcc/1/AppAddr/1/AddrType", "chr", "GR", value="URI")
_n("./DMAcc/1/AAuthPref", "chr", "GR", value="DIGEST")
_n("./DMAcc/1/AppAuth", acl="GA")
_n("./DMAcc/1/AppAuth/1", acl="GA")
_n("./DMAcc/1/AppAuth/1/AAuthLevel", "chr", "GR", value="CLCRED")
_n("./DMAcc/1/AppAuth/1/AAuthType", "chr", "GR", value="DIGEST")
_n("./DMAcc/1/AppAuth/1/AAuthName", "chr", "GR", value=_Attr("username"))
_n("./DMAcc/1/AppAuth/1/AAuthSecret", "chr", "R", value=_Attr("client_secret"))
_n("./DMAcc/1/AppAuth/1/AAuthData", "bin", "R", value=_Attr("client_nonce"))
_n("./DMAcc/1/AppAuth/2", acl="GA")
_n("./DMAcc/1/AppAuth/2/AAuthLevel", "chr", "GR", value="SRVCRED")
_n("./DMAcc/1/AppAuth/2/AAuthType", "chr", "GR", value="DIGEST")
_n("./DMAcc/1/AppAuth/2/AAuthName", "chr", "GR", value=_Attr("server_id"))
_n("./DMAcc/1/AppAuth/2/AAuthSecret", "chr", "R", value=_Attr("server_secret"))
_n("./DMAcc/1/AppAuth/2/AAuthData", "bin", "R", value=_Attr("server_nonce"))
_n("./FUMO", acl="GA")
_n(FUMO_ROOT, acl="G", typ="urn:oma:mo:oma-fumo:1.0")
_n(FUMO_ROOT + "/PkgName", "chr", "GR", value="")
_n(FUMO_ROOT + "/PkgVersion", "chr", "GR", value="")
_n(FUMO_ROOT + "/Download", acl="GE")
_n(FUMO_ROOT + "/Download/PkgURL", "chr", "GR", value="")
_n(FUMO_ROOT + "/Update", acl="GE")
_n(FUMO_ROOT + "/Update/PkgData", "bin", "R", value=b"")
_n(FUMO_ROOT + "/DownloadAndUpdate", acl="GE")
_n(FUMO_ROOT + "/DownloadAndUpdate/PkgURL", "chr", "GR", value="")
_n(FUMO_ROOT + "/State", "int", value=_Attr("fumo_state"))
_n(FUMO_ROOT + "/Ext", acl="GA")
_n("./Diag", typ="urn:oma:mo:oma-diagmon:1.0")
_n("./Diag/Battery", "int", value="87")
_n("./Diag/Signal", "int", value="-71")
_n("./Diag/MemFree", "int", value="1048576")
_n("./Diag/Network", acl="G")
_n("./Diag/Network/Operator", "chr", value="Acme Mobile")
_n("./Diag/Network/CellID", "chr", value=_Attr("cell_id"))
_n("./Diag/Ping", acl="GE")
_n("./Diag/Reboot", acl="E")
_n("./Inbox", acl="A", typ="urn:oma:mo:oma-dm-inbox:1.0")

_CHILDREN: dict[str, list[str]] = {}
for _p in _T:
    if _p != ".":
        _parent, _, _name = _p.rpartition("/")
        _CHILDREN.setdefault(_parent, []).append(_name)

_DELETED = ("deleted",)   # overlay marker


def norm_uri(uri: str | None) -> str:
    """``DevInfo/Mod`` / ``./DevInfo/Mod/`` → ``./DevInfo/Mod``; query part dropped."""
    if not uri:
        return "."
    uri = uri.split("?", 1)[0]
    if uri.startswith("./"):
        pass
    elif uri == ".":
        return "."
    elif uri.startswith("/"):
        uri = "." + uri
    else:
        uri = "./" + uri
    while len(uri) > 2 and uri.endswith("/"):
        uri = uri[:-1]
    return uri


# --- the device -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """Work a FUMO Exec left for the I/O layer (download, update)."""

    kind: str                  # download | update | downloadandupdate
    url: str | None
    correlator: str | None
    node: str = FUMO_ROOT
    result: int | None = None  # FUMO result code once done
    nbytes: int = 0


class VirtualDevice:
    """One device: identity, credentials, tree overlay, FUMO state.  Small on purpose."""

    __slots__ = ("index", "dev_id", "msisdn", "username", "client_secret", "server_secret",
                 "client_nonce", "server_nonce", "fwv", "swv", "fumo_state", "overlay",
                 "profile", "faults", "pending_alerts", "jobs", "sessions", "pkg_data",
                 "cell_id", "log", "_devinfo", "_md5k", "_pkg1")

    def __init__(self, index: int, profile: DeviceProfile, *, faults: FaultPlan | None = None,
                 dev_id: str | None = None, msisdn: str | None = None,
                 username: str | None = None, client_secret: str | None = None,
                 server_secret: str | None = None, client_nonce: bytes | None = None,
                 server_nonce: bytes | None = None) -> None:
        self.index = index
        self.profile = profile
        self.dev_id = dev_id or f"IMEI:{356938030000000 + index:015d}"
        self.msisdn = msisdn or f"+4479{index:08d}"
        self.username = username or f"dev{index}"
        self.client_secret = client_secret or f"clientpw-{index}"
        self.server_secret = server_secret or f"srvpw-{index}"
        # the nonces a provisioned device starts with (as after a bootstrap); derived from the
        # index so that a server started separately knows them too (fleet.account_for_username)
        self.client_nonce = client_nonce if client_nonce is not None else \
            hashlib.md5(b"client-nonce-%d" % index).digest()
        self.server_nonce = server_nonce if server_nonce is not None else \
            hashlib.md5(b"server-nonce-%d" % index).digest()
        self.fwv = profile.fwv
        self.swv = profile.fwv + "_r1"
        self.fumo_state = int(FumoState.IDLE)
        self.overlay: dict[str, Any] | None = None
        self.faults = faults or FaultPlan()
        self.pending_alerts: list[Command] = []
        self.jobs: list[Job] = []
        self.sessions = 0
        self.pkg_data: bytes | None = None
        self.cell_id = f"{262 + index % 7:03d}-{index % 4096:04X}"
        self.log: list[tuple[str, Any]] | None = None
        self._devinfo: tuple[tuple[str, str, str, str], list[Item]] | None = None
        self._md5k: tuple[str, str, bytes] | None = None
        #: (values, template): None no template possible, False not built yet (one session)
        self._pkg1: tuple[tuple[Any, ...], _Template | None | bool] | None = None

    # attribute values used by the template
    @property
    def man(self) -> str:
        return self.profile.man

    @property
    def mod(self) -> str:
        return self.profile.mod

    @property
    def lang(self) -> str:
        return self.profile.lang

    @property
    def server_id(self) -> str:
        return self.profile.server_id

    @property
    def server_url(self) -> str:
        return self.profile.server_url

    def account(self) -> auth.DmAccount:
        """The account record the server must hold for this device."""
        return auth.DmAccount(dev_id=self.dev_id, username=self.username,
                              client_secret=self.client_secret, client_nonce=self.client_nonce,
                              server_id=self.profile.server_id, server_secret=self.server_secret,
                              server_nonce=self.server_nonce)

    def devinfo_items(self) -> list[Item]:
        """The ./DevInfo Replace items of package 1 (built once; DevInfo leaves are read-only,
        so only a profile change makes new ones)."""
        prof = self.profile
        key = (self.dev_id, prof.man, prof.mod, prof.lang)
        hit = self._devinfo
        if hit is None or hit[0] != key:
            items = [Item(source=f"./DevInfo/{leaf}", data=self.value(f"./DevInfo/{leaf}"))
                     for leaf in ("DevId", "Man", "Mod", "DmV", "Lang")]
            hit = self._devinfo = (key, items)
        return hit[1]

    def md5_cred(self, secret: str) -> str:
        """Cred/Data of syncml:auth-md5 for the current client nonce; K = B64(MD5(name ":"
        secret)) is computed once per (name, secret)."""
        k = self._md5k
        if k is None or k[0] != self.username or k[1] != secret:
            k = self._md5k = (self.username, secret, auth.md5_key(self.username, secret))
        return b2a_base64(md5(k[2] + b":" + self.client_nonce).digest(),
                          newline=False).decode("ascii")

    # --- tree -------------------------------------------------------------------------------------

    def node(self, path: str) -> tuple[str, str, str | None, Any] | None:
        ov = self.overlay
        if ov is not None and path in ov:
            n = ov[path]
            return None if n is _DELETED else n
        return _T.get(path)

    def value(self, path: str) -> Any:
        n = self.node(path)
        if n is None:
            return None
        v = n[3]
        if isinstance(v, _Attr):
            v = getattr(self, v.name)
            if isinstance(v, int):
                v = str(v)
        return v

    def children(self, path: str) -> list[str]:
        names = [c for c in _CHILDREN.get(path, ()) if self.node(path + "/" + c) is not None]
        if self.overlay:
            prefix = path + "/"
            for p, n in self.overlay.items():
                if n is not _DELETED and p.startswith(prefix) and "/" not in p[len(prefix):] \
                        and p not in _T:
                    names.append(p[len(prefix):])
        return names

    def _set(self, path: str, n: tuple[str, str, str | None, Any] | object) -> None:
        if self.overlay is None:
            self.overlay = {}
        self.overlay[path] = n

    def set_value(self, path: str, value: Any, fmt: str | None = None,
                  typ: str | None = None) -> None:
        n = self.node(path)
        assert n is not None
        if path == "./DevDetail/FwV":
            self.fwv = str(value)
            return
        self._set(path, (fmt or n[0], n[1], typ or n[2], value))

    def subtree(self, path: str) -> list[str]:
        out = [path]
        for c in self.children(path):
            out.extend(self.subtree(path + "/" + c))
        return out

    def snapshot(self) -> tuple[dict[str, Any] | None, str, int]:
        return (dict(self.overlay) if self.overlay is not None else None, self.fwv,
                self.fumo_state)

    def restore(self, snap: tuple[dict[str, Any] | None, str, int]) -> None:
        self.overlay, self.fwv, self.fumo_state = snap

    # --- FUMO -----------------------------------------------------------------------------------

    def finish_job(self, job: Job, result: int) -> Command:
        """Record a finished FUMO job; returns (and keeps) its Generic Alert 1226."""
        job.result = result
        ok = 200 <= result < 300
        if job.kind in ("update", "downloadandupdate"):
            if ok:
                version = self.value(FUMO_ROOT + "/PkgVersion") or _next_version(self.fwv)
                self.fwv = str(version)
                self.swv = self.fwv + "_r1"
                self.fumo_state = int(FumoState.UPDATE_SUCCESSFUL_NO_DATA)
            else:
                self.fumo_state = int(FumoState.UPDATE_FAILED_NO_DATA if job.kind ==
                                      "downloadandupdate" else FumoState.UPDATE_FAILED_HAVE_DATA)
        else:
            self.fumo_state = int(FumoState.READY_TO_UPDATE if ok else FumoState.DOWNLOAD_FAILED)
        alert = Command(
            name="Alert", data=str(int(AlertCode.GENERIC_ALERT)), correlator=job.correlator,
            items=[Item(source=job.node, meta=Meta(type=FUMO_ALERT_TYPES[job.kind], format="int"),
                        data=str(result))])
        self.pending_alerts.append(alert)
        if job in self.jobs:
            self.jobs.remove(job)
        return alert

    def update_result(self, downloaded: int, expected: int | None) -> int:
        """The FUMO result code of an update after ``downloaded`` bytes arrived."""
        if expected is not None and downloaded != expected:
            return int(FumoResult.CORRUPTED_PACKAGE)
        if self.faults.fail_update is not None:
            return int(self.faults.fail_update)
        return int(FumoResult.SUCCESSFUL)

    def session(self, *, session_id: str | None = None, alert: int = 1201,
                url: str | None = None, rng: random.Random | None = None) -> "ClientSession":
        return ClientSession(self, session_id=session_id, alert=alert, url=url, rng=rng)


def _next_version(v: str) -> str:
    head, _, tail = v.rpartition(".")
    if tail.isdigit():
        return f"{head}.{int(tail) + 1}" if head else str(int(tail) + 1)
    return v + ".1"


# --- the client session engine ----------------------------------------------------------------------


_HDR_META: dict[tuple[int, int], Meta] = {}
_CRED_META = {"md5": Meta(type=auth.AUTH_MD5, format="b64"),
              "basic": Meta(type=auth.AUTH_BASIC, format="b64")}


def _hdr_meta(max_msg: int, max_obj: int) -> Meta:
    """The SyncHdr Meta of a profile (shared: encoders only read it)."""
    hit = _HDR_META.get((max_msg, max_obj))
    if hit is None:
        hit = _HDR_META[(max_msg, max_obj)] = Meta(max_msg_size=str(max_msg),
                                                   max_obj_size=str(max_obj))
    return hit


class ClientSession(ClientBase):
    """One DM session, client side, sans-IO.

    ``first()`` → bytes of package 1; then repeatedly ``receive(reply_body)`` and, when
    ``jobs`` is not empty, run them and call ``device.finish_job``; ``next()`` gives the next
    message to POST (to ``url``, which follows RespURI) or None when the session is over.
    ``outcome`` says how it ended: ``completed``, ``aborted`` (1223), ``auth_failed``,
    ``error``.
    """

    __slots__ = ()      # the state and the per-message methods: _client.ClientBase

    # --- building messages ---------------------------------------------------------------------------

    def _hdr(self) -> SyncHdr:
        dev = self.device
        self.msg_id += 1
        prof = self.profile
        hdr = SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id=self.session_id,
                      msg_id=str(self.msg_id), target=self.url, source=dev.dev_id,
                      meta=_hdr_meta(prof.max_msg_size, prof.max_obj_size))
        scheme = self.auth_scheme
        if scheme != "none":
            hdr.source_name = dev.username
        if not self.authenticated or scheme == "hmac":
            secret = dev.client_secret + "-wrong" if dev.faults.wrong_credentials \
                else dev.client_secret
            if scheme == "md5":
                hdr.cred = Cred(meta=_CRED_META["md5"], data=dev.md5_cred(secret))
            elif scheme == "basic":
                hdr.cred = Cred(meta=_CRED_META["basic"],
                                data=auth.basic_cred(dev.username, secret))
        return hdr

    def _package1(self) -> list[Command]:
        dev = self.device
        cmds = [Command(name="Alert", data=str(self.alert))]
        cmds.append(Command(name="Replace", items=dev.devinfo_items()))
        if dev.pending_alerts:
            cmds.extend(dev.pending_alerts)
            self.sent_alerts = list(dev.pending_alerts)
        return cmds

    def _build(self) -> _Outgoing:
        """Encodes the next message: header status, then as many outbox commands as fit."""
        limit = self.server_max_msg or 0
        body_cmds: list[Command] = []
        if self.hdr_status is not None:
            body_cmds.append(self.hdr_status)
            self.hdr_status = None
        pending = self.out_chunks + self.outbox
        self.out_chunks = []
        self.outbox = []
        hdr = self._hdr()
        msg = Message(hdr=hdr, commands=body_cmds + pending, final=self.server_final)
        _number(msg.commands)
        data = self._encode(msg)
        if limit and len(data) > limit and pending:
            data, rest = self._fit(hdr, body_cmds, pending, limit)
            self.outbox = rest
        else:
            self.outbox = []
        out = self._finish(data)
        return out

    def _fit(self, hdr: SyncHdr, head: list[Command], pending: list[Command],
             limit: int) -> tuple[bytes, list[Command]]:
        """Splits ``pending`` so that one message stays under ``limit`` bytes."""
        taken: list[Command] = list(head)
        rest = list(pending)
        data = b""
        while rest:
            trial = taken + [rest[0]]
            msg = Message(hdr=hdr, commands=trial, final=False)
            _number(msg.commands)
            enc = self._encode(msg)
            if len(enc) <= limit:
                taken = trial
                rest.pop(0)
                data = enc
                continue
            # too big for what is left: a large object is cut to fill the message
            first, remainder = self._chunk(hdr, taken, rest[0], limit)
            if first is not None:
                taken.append(first)
                rest[0] = remainder
                msg = Message(hdr=hdr, commands=taken, final=False)
                _number(msg.commands)
                data = self._encode(msg)
            elif len(taken) == len(head):  # cannot split and nothing else fits: send it
                taken.append(rest.pop(0))
                msg = Message(hdr=hdr, commands=taken, final=not rest and self.server_final)
                _number(msg.commands)
                data = self._encode(msg)
            break
        if not rest:
            msg = Message(hdr=hdr, commands=taken, final=self.server_final)
            _number(msg.commands)
            data = self._encode(msg)
        return data, rest

    def _chunk(self, hdr: SyncHdr, head: list[Command], cmd: Command,
               limit: int) -> tuple[Command | None, Command]:
        """First chunk of a one-item Results/Replace too big for a message, and the rest."""
        if cmd.name not in ("Results", "Replace") or not cmd.items or len(cmd.items) != 1:
            return None, cmd
        item = cmd.items[0]
        data = item.data
        if not isinstance(data, (str, bytes)) or len(data) < 2:
            return None, cmd
        cont = id(cmd) in self._continuations     # only the first chunk carries Meta Size
        size_meta = (Meta(format=item.meta.format, type=item.meta.type)
                     if item.meta is not None else None) if cont else \
            _meta_with_size(item.meta, len(data))
        # measure the overhead with an empty item, then cut
        probe = _copy_cmd(cmd, Item(source=item.source, target=item.target,
                                    meta=size_meta, data=data[:1], more_data=True))
        msg = Message(hdr=hdr, commands=head + [probe], final=False)
        _number(msg.commands)
        overhead = len(self._encode(msg)) + 16
        room = limit - overhead
        if room <= 0:
            return None, cmd
        if isinstance(data, str):   # keep multi-byte characters whole: cut on the encoded size
            cut = len(data[:room].encode()[:room].decode("utf-8", "ignore"))
        else:
            cut = room
        first = _copy_cmd(cmd, Item(source=item.source, target=item.target,
                                    meta=size_meta, data=data[:cut], more_data=True))
        rest = _copy_cmd(cmd, Item(source=item.source, target=item.target,
                                   meta=Meta(format=item.meta.format, type=item.meta.type)
                                   if item.meta is not None else None, data=data[cut:]))
        rest.cmd_id = None
        self._continuations.add(id(rest))
        return first, rest

    # --- the API ------------------------------------------------------------------------------------

    def _pkg1_message(self, session_id: str, cred: str | None, alert: str) -> Message:
        """Package 1 in the common case (no pending alerts, nothing else queued), with the
        given session ID, Cred Data (None: as the scheme says) and alert code."""
        dev = self.device
        prof = self.profile
        self.msg_id = 0
        hdr = self._hdr()
        if cred is not None:
            hdr.cred = Cred(meta=_CRED_META[self.auth_scheme], data=cred)
        hdr.session_id = session_id
        cmds = [Command(name="Alert", cmd_id="1", data=alert),
                Command(name="Replace", cmd_id="2", items=dev.devinfo_items())]
        return Message(hdr=hdr, commands=cmds, final=True)

    def _pkg1_template(self) -> "_Template | None":
        """The encoded package 1 of this device cut around its session ID, Cred Data and
        alert code; None when the encoding does not allow it (checked against the encoder
        with two sets of values)."""
        scheme = self.auth_scheme
        with_cred = scheme in ("md5", "basic")
        if scheme not in ("md5", "basic", "none", "hmac"):
            return None
        sentinels = ("QzSIDzQ", "QzCREDzQ" if with_cred else None, "QzALERTzQ")
        msg_id = self.msg_id
        try:
            data = self._encode(self._pkg1_message(*sentinels))  # type: ignore[arg-type]
            cuts = []
            for s in sentinels:
                if s is None:
                    continue
                b = s.encode()
                if data.count(b) != 1:
                    return None
                cuts.append((data.index(b), len(b)))
            if [c[0] for c in cuts] != sorted(c[0] for c in cuts):
                return None
            parts = []
            pos = 0
            for at, n in cuts:
                parts.append(data[pos:at])
                pos = at + n
            parts.append(data[pos:])
            tpl = _Template(tuple(parts), with_cred)
            for sid, cred, alert in (("1", "AAAA", 1200), ("FFFE", "x/y+z" * 5 + "==", 1201)):
                want = self._encode(self._pkg1_message(sid, cred if with_cred else None,
                                                       str(alert)))
                if tpl.fill(sid, cred if with_cred else None, alert) != want:
                    return None
            return tpl
        finally:
            self.msg_id = msg_id

    # --- server side checks --------------------------------------------------------------------------

    def _check_server(self, hdr: SyncHdr) -> int:
        dev = self.device
        cred = hdr.cred
        if cred is None:
            return int(StatusCode.OK)
        if not self.profile.verify_server:
            return int(StatusCode.AUTHENTICATION_ACCEPTED)
        data = cred.data.decode() if isinstance(cred.data, bytes) else (cred.data or "")
        ok = auth.verify_md5(data, dev.profile.server_id, dev.server_secret, dev.server_nonce)
        self.server_authenticated = ok
        return int(StatusCode.AUTHENTICATION_ACCEPTED if ok else StatusCode.INVALID_CREDENTIALS)

    def _on_status(self, st: Command) -> None:
        code = _int(st.data)
        if st.cmd == "Alert" and self.sent_alerts and 200 <= code < 300:
            # our Generic Alerts were delivered: never send them again
            for a in self.sent_alerts:
                if a in self.device.pending_alerts:
                    self.device.pending_alerts.remove(a)

    # --- executing server commands ---------------------------------------------------------------------

    def _execute(self, cmd: Command, msg_ref: str | None) -> list[Command]:
        name = cmd.name
        if self.in_chunk is not None and not _continues(cmd, self.in_chunk):
            # a new command while a large object is unfinished: 1225 and drop it
            uri = self.in_chunk[0]
            self.in_chunk = None
            out = [Command(name="Alert", data=str(int(AlertCode.NO_END_OF_DATA)),
                           items=[Item(target=uri)])]
            return out + self._execute(cmd, msg_ref)
        if name in ("Atomic", "Sequence"):
            return self._container(cmd, msg_ref)
        code, results = self._run(cmd, in_atomic=False)
        out = [self._status_for(cmd, msg_ref, code, results)]
        if isinstance(results, Command) and code == 200:
            results.msg_ref = msg_ref        # Results carry MsgRef/CmdRef of their Get
            out.append(results)
        return out

    def _status_for(self, cmd: Command, msg_ref: str | None, code: int,
                    extra: Any = None) -> Command:
        targets = [it.target for it in cmd.items or () if it.target] or None
        sources = [it.source for it in cmd.items or () if it.source] or None
        st = _status(msg_ref, cmd.cmd_id, cmd.name, code, targets=targets, sources=sources)
        if isinstance(extra, list):       # UI answers ride in Status Items
            st.items = extra
        self.results.append((cmd.name or "", code))
        return st

    def _container(self, cmd: Command, msg_ref: str | None) -> list[Command]:
        dev = self.device
        children = cmd.commands or []
        out: list[Command] = []
        if cmd.name == "Atomic":
            snap = dev.snapshot()
            codes: list[tuple[Command, int, Any]] = []
            failed = False
            for child in children:
                if child.name in ("Atomic", "Get"):
                    code, res = int(StatusCode.COMMAND_FAILED), None
                else:
                    code, res = self._run(child, in_atomic=True)
                codes.append((child, code, res))
                if code >= 300:
                    failed = True
                    break
            if failed:
                dev.restore(snap)
                done = {id(c) for c, _, _ in codes}
                out.append(self._status_for(cmd, msg_ref, int(StatusCode.ATOMIC_FAILED)))
                for child, code, res in codes:
                    out.append(self._status_for(child, msg_ref, code if code >= 300 else
                                                int(StatusCode.ATOMIC_ROLLBACK_OK)))
                for child in children:
                    if id(child) not in done:
                        out.append(self._status_for(child, msg_ref,
                                                    int(StatusCode.NOT_EXECUTED)))
            else:
                out.append(self._status_for(cmd, msg_ref, 200))
                for child, code, res in codes:
                    out.append(self._status_for(child, msg_ref, code,
                                                res if isinstance(res, list) else None))
            return out
        # Sequence: in order; after a "No"/cancel the rest is not executed (215)
        out.append(self._status_for(cmd, msg_ref, 200))
        skip = False
        for child in children:
            if skip:
                out.append(self._status_for(child, msg_ref, int(StatusCode.NOT_EXECUTED)))
                continue
            if child.name in ("Atomic", "Sequence"):
                out.extend(self._container(child, msg_ref))
                continue
            code, res = self._run(child, in_atomic=False)
            out.append(self._status_for(child, msg_ref, code,
                                        res if isinstance(res, list) else None))
            if isinstance(res, Command) and code == 200:
                res.msg_ref = msg_ref
                out.append(res)
            if child.name == "Alert" and code in (304, 214, 408):
                skip = True
        return out

    def _run(self, cmd: Command, *, in_atomic: bool) -> tuple[int, Any]:
        """Executes one non-container command: (status code, Results command / UI items)."""
        name = cmd.name
        try:
            if name == "Get":
                return self._get(cmd)
            if name in ("Replace", "Add"):
                return self._write(cmd, add=name == "Add"), None
            if name == "Delete":
                return self._delete(cmd), None
            if name == "Exec":
                return self._exec(cmd), None
            if name == "Copy":
                return self._copy(cmd), None
            if name == "Alert":
                return self._alert(cmd)
        except (DmError, ValueError) as exc:
            self.detail = f"{name}: {exc}"
            return int(StatusCode.COMMAND_FAILED), None
        return int(StatusCode.COMMAND_NOT_IMPLEMENTED), None

    def _get(self, cmd: Command) -> tuple[int, Any]:
        dev = self.device
        items: list[Item] = []
        for it in cmd.items or ():
            raw = it.target or ""
            path = norm_uri(raw)
            n = dev.node(path)
            if n is None:
                return int(StatusCode.NOT_FOUND), None
            if "G" not in n[1]:
                return int(StatusCode.COMMAND_NOT_ALLOWED), None
            if "?" in raw:
                query = raw.split("?", 1)[1]
                if query.startswith("prop="):
                    prop = query[5:]
                    val = {"Format": n[0], "Type": n[2] or "text/plain",
                           "Name": path.rsplit("/", 1)[-1]}.get(prop)
                    if val is None:
                        return int(StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED), None
                    items.append(Item(source=raw, data=val))
                    continue
                if not query.startswith("list=Struct"):
                    return int(StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED), None
                for p in dev.subtree(path):
                    m = dev.node(p)
                    if m is not None and "G" in m[1]:
                        items.append(_result_item(dev, p, m, with_data=query == "list=StructData"))
                continue
            items.append(_result_item(dev, path, n, with_data=True))
        results = Command(name="Results", cmd_ref=cmd.cmd_id, items=items)
        return 200, results

    def _write(self, cmd: Command, *, add: bool) -> int:
        dev = self.device
        code = 200
        for it in cmd.items or ():
            path = norm_uri(it.target)
            meta = it.meta or cmd.meta
            data = it.data
            if it.target and "?prop=" in it.target:
                # node properties: ACL, Name and Title are replaceable (DM TND)
                prop = it.target.split("?prop=", 1)[1]
                if dev.node(path) is None:
                    return int(StatusCode.NOT_FOUND)
                if add or prop not in ("ACL", "Name", "Title"):
                    return int(StatusCode.COMMAND_NOT_ALLOWED)
                continue
            # large objects from the server
            if it.more_data or (self.in_chunk is not None and self.in_chunk[0] == path):
                assembled = self._chunk_in(cmd, it, path, meta)
                if assembled is None:
                    return int(StatusCode.CHUNKED_ITEM_ACCEPTED)
                if isinstance(assembled, int):
                    return assembled
                data = assembled
            elif meta is not None and meta.size and meta.size.isdigit() and \
                    int(meta.size) > self.profile.max_obj_size:
                return int(StatusCode.REQUEST_ENTITY_TOO_LARGE)
            n = dev.node(path)
            fmt = meta.format if meta is not None and meta.format else None
            typ = meta.type if meta is not None and meta.type else None
            if add:
                if n is not None:
                    return int(StatusCode.ALREADY_EXISTS)
                parent = path.rpartition("/")[0] or "."
                pn = dev.node(parent)
                if pn is None:
                    return int(StatusCode.NOT_FOUND)
                if pn[0] != "node":
                    return int(StatusCode.COMMAND_NOT_ALLOWED)
                if "A" not in pn[1] and "R" not in pn[1] and parent not in ("./FUMO/1/Ext",):
                    return int(StatusCode.COMMAND_NOT_ALLOWED)
                if fmt == "node":
                    dev._set(path, ("node", "GRAD", typ, None))
                else:
                    dev._set(path, (fmt or "chr", "GRD", typ, _value(data, fmt)))
                continue
            if n is None:
                return int(StatusCode.NOT_FOUND)
            if n[0] == "node" or "R" not in n[1]:
                return int(StatusCode.COMMAND_NOT_ALLOWED)
            dev.set_value(path, _value(data, fmt or n[0]), fmt, typ)
            if path == FUMO_ROOT + "/Update/PkgData":
                dev.pkg_data = data if isinstance(data, bytes) else str(data or "").encode()
                dev.fumo_state = int(FumoState.READY_TO_UPDATE)
        return code

    def _chunk_in(self, cmd: Command, it: Item, path: str, meta: Meta | None) -> Any:
        """Buffers a large-object chunk; the whole value when complete, a status on error."""
        data = it.data if it.data is not None else b""
        if self.in_chunk is None:
            size = int(meta.size) if meta is not None and meta.size and meta.size.isdigit() \
                else None
            if size is not None and size > self.profile.max_obj_size:
                return int(StatusCode.REQUEST_ENTITY_TOO_LARGE)
            self.in_chunk = (path, size, [data], cmd, it)
        else:
            self.in_chunk[2].append(data)
        if it.more_data:
            return None
        path, size, parts, _, _ = self.in_chunk
        self.in_chunk = None
        if any(isinstance(p, bytes) for p in parts):
            whole: Any = b"".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
            n = len(whole)
        else:
            whole = "".join(p.decode() if isinstance(p, bytes) else str(p) for p in parts)
            n = len(whole.encode())
            fmt = meta.format if meta is not None else None
            if fmt == "b64":
                try:
                    n2 = len(base64.b64decode(whole))
                except ValueError:
                    n2 = -1
                if size is not None and n2 == size:
                    n = n2
        if size is not None and n != size:
            return int(StatusCode.SIZE_MISMATCH)
        return whole

    def _delete(self, cmd: Command) -> int:
        dev = self.device
        for it in cmd.items or ():
            path = norm_uri(it.target)
            n = dev.node(path)
            if n is None:
                return int(StatusCode.NOT_FOUND)
            if path == "." or (path in _T and "D" not in n[1]):
                return int(StatusCode.COMMAND_NOT_ALLOWED)
            for p in dev.subtree(path):
                dev._set(p, _DELETED)
        return 200

    def _copy(self, cmd: Command) -> int:
        dev = self.device
        for it in cmd.items or ():
            src, dst = norm_uri(it.source), norm_uri(it.target)
            sn = dev.node(src)
            if sn is None:
                return int(StatusCode.NOT_FOUND)
            if sn[0] == "node" or "G" not in sn[1]:
                return int(StatusCode.COMMAND_NOT_ALLOWED)
            value = dev.value(src)
            dn = dev.node(dst)
            if dn is not None:
                if dn[0] == "node" or "R" not in dn[1]:
                    return int(StatusCode.COMMAND_NOT_ALLOWED)
                dev.set_value(dst, value)
            else:
                pn = dev.node(dst.rpartition("/")[0] or ".")
                if pn is None:
                    return int(StatusCode.NOT_FOUND)
                if pn[0] != "node":
                    return int(StatusCode.COMMAND_NOT_ALLOWED)
                dev._set(dst, (sn[0], "GRD", sn[2], value))
        return 200

    def _exec(self, cmd: Command) -> int:
        dev = self.device
        items = cmd.items or []
        if len(items) != 1:
            return int(StatusCode.INCOMPLETE_COMMAND)
        path = norm_uri(items[0].target)
        n = dev.node(path)
        if n is None:
            return int(StatusCode.NOT_FOUND)
        if "E" not in n[1]:
            return int(StatusCode.COMMAND_NOT_ALLOWED)
        if path.startswith(FUMO_ROOT + "/"):
            op = path[len(FUMO_ROOT) + 1:]
            kind = {"Download": "download", "Update": "update",
                    "DownloadAndUpdate": "downloadandupdate"}.get(op)
            if kind is None:
                return int(StatusCode.COMMAND_NOT_ALLOWED)
            url = dev.value(f"{FUMO_ROOT}/{op}/PkgURL") if kind != "update" else None
            if kind != "update" and not url:
                return int(StatusCode.INCOMPLETE_COMMAND)
            if dev.jobs:
                return int(StatusCode.FORBIDDEN)    # an update is already running
            job = Job(kind, url, cmd.correlator)
            dev.jobs.append(job)
            self.jobs.append(job)
            dev.fumo_state = int(FumoState.DOWNLOAD_PROGRESSING if kind != "update"
                                 else FumoState.UPDATE_PROGRESSING)
            return int(StatusCode.ACCEPTED_FOR_PROCESSING)
        return 200    # diagnostics: Ping, Reboot

    def _alert(self, cmd: Command) -> tuple[int, Any]:
        code = _int(cmd.data)
        if code == AlertCode.NEXT_MESSAGE:
            return 200, None
        if not 1100 <= code <= 1104:
            return int(StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED), None
        items = cmd.items or []
        if len(items) < 2:
            return int(StatusCode.INCOMPLETE_COMMAND), None
        answer = self.profile.ui_answer
        if self.device.faults.decline_optin and code == AlertCode.CONFIRM_OR_REJECT:
            answer = "decline"
        if answer == "unsupported":
            return int(StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED), None
        if answer == "cancel":
            return int(StatusCode.OPERATION_CANCELLED), None
        if answer == "timeout" and code != AlertCode.DISPLAY:
            return int(StatusCode.REQUEST_TIMEOUT), None
        if code == AlertCode.CONFIRM_OR_REJECT:
            return (200 if answer == "accept" else int(StatusCode.NOT_MODIFIED)), None
        if code == AlertCode.TEXT_INPUT:
            return 200, [Item(data=self.profile.text_answer)]
        if code == AlertCode.SINGLE_CHOICE:
            if len(items) < 3:
                return int(StatusCode.INCOMPLETE_COMMAND), None
            return 200, [Item(data="1")]
        if code == AlertCode.MULTIPLE_CHOICE:
            if len(items) < 3:
                return int(StatusCode.INCOMPLETE_COMMAND), None
            return 200, [Item(data=str(i)) for i in range(1, min(3, len(items) - 1))]
        return 200, None


# --- helpers ---------------------------------------------------------------------------------------


def _int(text: Any) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0


_IDS = [str(i) for i in range(1, 257)]


def _number(cmds: list[Command]) -> None:
    ids = _IDS
    for i, c in enumerate(cmds):
        c.cmd_id = ids[i] if i < 256 else str(i + 1)


def _copy_cmd(cmd: Command, item: Item) -> Command:
    return Command(name=cmd.name, cmd_id=cmd.cmd_id, msg_ref=cmd.msg_ref, cmd_ref=cmd.cmd_ref,
                   meta=cmd.meta, target_refs=cmd.target_refs, source_refs=cmd.source_refs,
                   items=[item])


def _meta_with_size(meta: Meta | None, size: int) -> Meta:
    if meta is None:
        return Meta(size=str(size))
    return Meta(format=meta.format, type=meta.type, size=str(size))


def _value(data: Any, fmt: str | None) -> Any:
    if fmt == "bin":
        return data if isinstance(data, bytes) else str(data or "").encode()
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data
    return "" if data is None else data


def _result_item(dev: VirtualDevice, path: str, n: tuple[str, str, str | None, Any], *,
                 with_data: bool) -> Item:
    fmt, _, typ, _ = n
    if fmt == "node":
        return Item(source=path, meta=Meta(format="node", type=typ),
                    data="/".join(dev.children(path)) if with_data else None)
    value = dev.value(path) if with_data else None
    meta = None
    if fmt != "chr" or (typ and typ != "text/plain"):
        meta = Meta(format=fmt, type=typ)
    if fmt == "bin" and isinstance(value, (bytes, bytearray)) and dev.profile.encoding == "xml":
        meta = Meta(format="b64", type=typ)
        value = base64.b64encode(bytes(value)).decode()
    return Item(source=path, meta=meta, data=value)


def _continues(cmd: Command, chunk: tuple[str, int | None, list[Any], Command, Item]) -> bool:
    """True when ``cmd`` carries the next chunk of the object being assembled."""
    if cmd.name not in ("Replace", "Add") or not cmd.items:
        return False
    return norm_uri(cmd.items[0].target) == chunk[0]
