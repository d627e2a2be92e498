"""Device records (L4): identity rules (acceptDevicePolicy, DevId parsing), the streamed
device import (importDeviceInstances) and the record edits and lookups of the device API.

When the device that answers a notification is not the one on record (another IMEI behind the
same MSISDN), ``acceptDevicePolicy`` of the task decides (DESIGN.md §3, seeds §6.1):

* 10 — accept any IMEI with the same TAC (first 8 digits) as the one on record;
* 20 — accept any IMEI if the record has none;
* 30 — accept any IMEI;
* 40 — ask the carrier: an async callback (a webhook) answers accept or reject.
"""
from __future__ import annotations

import asyncio
import collections
import csv
import datetime
import heapq
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal

import aiohttp
import msgspec

from .errors import NotFound, ValidationError
from .model import Device, DmAccount, where_of
from .store.base import ImportReport, Store
from .urlguard import UrlGuard, UrlRefused

POLICY_SAME_TAC = 10
POLICY_ANY_IF_NONE = 20
POLICY_ANY = 30
POLICY_CARRIER_CALLBACK = 40
POLICIES = (POLICY_SAME_TAC, POLICY_ANY_IF_NONE, POLICY_ANY, POLICY_CARRIER_CALLBACK)

#: How long the carrier callback may take before the answer counts as "reject".
DEFAULT_CALLBACK_TIMEOUT = 5.0


def imei_of(dev_id: str | None) -> str | None:
    """The IMEI digits of a DevId URN (``IMEI:356938035643809``), else None."""
    if not dev_id:
        return None
    scheme, _, rest = dev_id.partition(":")
    if scheme.upper() == "IMEI" and rest.isdigit():
        return rest
    return None


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    accept: bool
    cause: str
    same_device: bool = False


#: ``callback(device, reported_dev_id, task_id) -> bool`` for policy 40.
CarrierCallback = Callable[[Device, str, str], Awaitable[bool]]


async def check_device_policy(policy: int, record: Device, reported_dev_id: str, *,
                              task_id: str = "",
                              callback: CarrierCallback | None = None) -> PolicyDecision:
    """Decides whether the device that reported ``reported_dev_id`` may stand for ``record``."""
    if reported_dev_id == record.dev_id:
        return PolicyDecision(True, "same device", same_device=True)
    reported_imei = imei_of(reported_dev_id)
    if reported_imei is not None and record.imei is not None and reported_imei == record.imei:
        return PolicyDecision(True, "same IMEI", same_device=True)
    if policy == POLICY_SAME_TAC:
        if record.imei and reported_imei and reported_imei[:8] == record.imei[:8]:
            return PolicyDecision(True, f"policy 10: {reported_dev_id} has the TAC on record")
        return PolicyDecision(False, f"refused by acceptDevicePolicy 10: {reported_dev_id} does not "
                                     f"have the TAC of the IMEI on record")
    if policy == POLICY_ANY_IF_NONE:
        if not record.imei:
            return PolicyDecision(True, "policy 20: no IMEI on record")
        return PolicyDecision(False, f"refused by acceptDevicePolicy 20: the record has IMEI "
                                     f"{record.imei}, device reported {reported_dev_id}")
    if policy == POLICY_ANY:
        return PolicyDecision(True, "policy 30: any IMEI accepted")
    if policy == POLICY_CARRIER_CALLBACK:
        if callback is None:
            return PolicyDecision(False, "refused by acceptDevicePolicy 40: no carrier callback "
                                         "configured")
        try:
            ok = await callback(record, reported_dev_id, task_id)
        except Exception as exc:  # a broken callback is a refusal, never a crash
            return PolicyDecision(False, f"refused by acceptDevicePolicy 40: carrier callback "
                                         f"failed ({type(exc).__name__})")
        if ok:
            return PolicyDecision(True, "policy 40: the carrier accepted")
        return PolicyDecision(False, "refused by acceptDevicePolicy 40: the carrier rejected "
                                     f"{reported_dev_id}")
    return PolicyDecision(False, f"unknown acceptDevicePolicy {policy}")


def http_carrier_callback(url: str, *, timeout: float = DEFAULT_CALLBACK_TIMEOUT,
                          session: aiohttp.ClientSession | None = None,
                          guard: UrlGuard | None = None) -> CarrierCallback:
    """Policy 40 over HTTP: POSTs ``{task_id, dev_id, msisdn, imei_on_record, reported_dev_id}``
    as JSON; the carrier answers ``{"decision": "accept"}`` or ``{"decision": "reject"}``.
    Anything else (error status, timeout, other JSON, a redirect, an address ``guard``
    refuses when connecting) counts as reject."""

    async def callback(record: Device, reported_dev_id: str, task_id: str) -> bool:
        body = {"task_id": task_id, "dev_id": record.dev_id, "msisdn": record.msisdn,
                "imei_on_record": record.imei, "reported_dev_id": reported_dev_id}
        own = session is None
        s = session or (guard.session() if guard is not None else aiohttp.ClientSession())
        try:
            if guard is not None:
                try:
                    guard.check_literal(url)
                except UrlRefused:
                    return False
            async with asyncio.timeout(timeout):
                async with s.post(url, json=body, allow_redirects=False) as resp:
                    if resp.status != 200:
                        return False
                    answer = await resp.json(content_type=None)
            return isinstance(answer, dict) and answer.get("decision") == "accept"
        finally:
            if own:
                await s.close()

    return callback


# --- device records: lookups and edits (getDeviceInstanceByDeviceID, updateDeviceInstance) ----


def is_bare_imei(ident: str) -> bool:
    """A device identifier given as a bare IMEI: 15 digits (the seeds' "device ID value")."""
    return len(ident) == 15 and ident.isdigit()


async def find_device(store: Store, ident: str) -> Device:
    """The device a DevId or a bare IMEI names: 15 digits are looked up in the IMEI index
    first (a dev_id of 15 digits is still found when no IMEI matches)."""
    if is_bare_imei(ident):
        try:
            return await store.device_by_imei(ident)
        except NotFound:
            pass
    return await store.get_device(ident)


#: Fields ``updateDeviceInstance`` may change; the others are the engine's (the DevId is the
#: record's key, times and DevInfo/DevDetail are what sessions report, a pending account is
#: what a bootstrap left).
UPDATABLE = frozenset({"imei", "msisdn", "capability", "tz", "account"})


def device_changes(patch: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge-patch of a device (RFC 7396) as ``Store.update_device`` changes: a field set
    to null is removed, ``account`` (an object) is merged into the stored account.  A field
    that is not updatable is refused naming it."""
    known = set(Device.__struct_fields__)
    changes: dict[str, Any] = {}
    for name in sorted(patch):
        value = patch[name]
        if name not in known:
            raise ValidationError(f"a device has no field {name!r}", where=f"$.{name}")
        if name not in UPDATABLE:
            raise ValidationError(f"{name} cannot be updated (updatable: "
                                  f"{', '.join(sorted(UPDATABLE))})", where=f"$.{name}")
        if name == "account" and value is not None and not isinstance(value, dict):
            raise ValidationError("account must be an object or null", where="$.account")
        changes[name] = value
    if not changes:
        raise ValidationError("nothing to update", where="$")
    return changes


# --- the streamed import (importDeviceInstances) ----------------------------------------------

#: CSV columns: the device's fields, then its DM account's (one row = one device).  A column
#: named by a DevInfo/DevDetail node (``./DevInfo/Mod``, ``./DevDetail/FwV``) fills that node of
#: the record's snapshot.  ``devId`` may be left out when ``imei`` is given (``IMEI:<imei>``).
#: A header names them in camelCase like the rest of the API (``devId``, ``clientPassword``);
#: the snake_case names of earlier versions (``dev_id``, ``client_password``) are accepted too,
#: and row errors name a column as the header spelled it.  (Internally: the snake_case names.)
DEVICE_COLUMNS = ("dev_id", "imei", "msisdn", "capability", "tz", "last_contact")
ACCOUNT_COLUMNS = ("server_id", "auth_scheme", "client_name", "client_password", "client_key",
                   "client_nonce", "server_password", "server_key", "server_nonce")
CSV_COLUMNS = DEVICE_COLUMNS + ACCOUNT_COLUMNS
#: each column's camelCase name (the documented spelling)
CSV_CAMEL = {n: n.split("_")[0] + "".join(w.title() for w in n.split("_")[1:])
             for n in CSV_COLUMNS}
_BY_CAMEL = {c.lower(): n for n, c in CSV_CAMEL.items()}
DEVINFO_PREFIX = "./DevInfo/"
DEVDETAIL_PREFIX = "./DevDetail/"

ImportFormat = Literal["csv", "ndjson"]
MEDIA_TYPES: dict[str, ImportFormat] = {
    "text/csv": "csv", "application/csv": "csv",
    "application/x-ndjson": "ndjson", "application/ndjson": "ndjson",
    "application/jsonl": "ndjson", "application/x-jsonlines": "ndjson",
}

MAX_LINE = 1024 * 1024        #: longest line kept; a longer one is one rejected row
MAX_ERRORS = 1000             #: row errors an import reports (the first ones by line)
IMPORT_CHUNK = 5_000          #: rows handed to the store per call (one write transaction)
BLOCK = 256 * 1024            #: bytes of complete lines parsed at a time


class RowError(msgspec.Struct):
    """One rejected row: its line in the file (1 = the first line, a CSV's header), the
    column (CSV) or field path (NDJSON) at fault, or None for the whole line, and why."""
    line: int
    where: str | None
    message: str


class ImportResult(msgspec.Struct, kw_only=True):
    rows: int = 0                 #: data rows read (blank lines not counted)
    created: int = 0
    replaced: int = 0
    rejected: int = 0
    errors: list[RowError] = []   #: the first MAX_ERRORS rejected rows by line
    errors_omitted: int = 0       #: rejected rows not listed in ``errors``


class _Bad(Exception):
    def __init__(self, where: str | None, message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message


def import_format(content_type: str, explicit: str | None = None) -> ImportFormat:
    """The format of an import body: ``explicit`` (csv | ndjson) or its media type."""
    if explicit:
        if explicit not in ("csv", "ndjson"):
            raise ValidationError(f"format is csv or ndjson, not {explicit!r}", where="format")
        return explicit  # type: ignore[return-value]
    fmt = MEDIA_TYPES.get(content_type.split(";", 1)[0].strip().lower())
    if fmt is None:
        raise ValidationError(f"an import is text/csv or application/x-ndjson, not "
                              f"{content_type!r}", where="Content-Type")
    return fmt


def parse_time(text: str) -> float:
    """Epoch seconds, or an ISO-8601 time (UTC unless it says otherwise)."""
    try:
        v = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(v):
            raise ValueError(f"not a time: {text!r}")
        return v
    t = datetime.datetime.fromisoformat(text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


def csv_row_builder(header: list[str], server_id: str) -> Callable[[list[str], float], Device]:
    """``build(row, now)`` → the Device a CSV row describes (its values not yet checked: the
    store validates every record), or raises ``_Bad(column, message)``.  The header must name
    only known columns, each once (ValidationError naming the column)."""
    names, _ = csv_header(header)
    seen = set(names)
    if "dev_id" not in seen and "imei" not in seen:
        raise ValidationError("the header names neither devId nor imei", where="devId")
    col = {name: i for i, name in enumerate(names)}
    ncols = len(names)
    plain = tuple((n, col[n]) for n in ("imei", "msisdn", "capability", "tz") if n in col)
    i_dev = col.get("dev_id")
    i_imei = col.get("imei")
    i_lc = col.get("last_contact")
    acc_cols = tuple((n, col[n]) for n in ACCOUNT_COLUMNS if n in col)
    i_scheme = col.get("auth_scheme")
    info = tuple((n, i) for n, i in col.items() if n.startswith(DEVINFO_PREFIX))
    detail = tuple((n, i) for n, i in col.items() if n.startswith(DEVDETAIL_PREFIX))

    def build(row: list[str], now: float) -> Device:
        if len(row) != ncols:
            raise _Bad(None, f"{len(row)} fields, the header has {ncols}")
        kw: dict[str, Any] = {n: v for n, i in plain if (v := row[i])}
        dev_id = row[i_dev] if i_dev is not None else ""
        if not dev_id:
            imei = row[i_imei] if i_imei is not None else ""
            if not imei:
                raise _Bad("dev_id", "devId (or imei) is required")
            dev_id = "IMEI:" + imei
        if i_lc is not None and row[i_lc]:
            try:
                kw["last_contact"] = parse_time(row[i_lc])
            except ValueError:
                raise _Bad("last_contact", "not a time (epoch seconds or ISO 8601)") from None
        if acc_cols:
            acc = {n: v for n, i in acc_cols if (v := row[i])}
            if acc:
                if "server_id" not in acc:
                    acc["server_id"] = server_id
                if i_scheme is not None and "auth_scheme" in acc:
                    acc["auth_scheme"] = acc["auth_scheme"].upper()
                kw["account"] = DmAccount(**acc)
        if info:
            kw["devinfo"] = {n: v for n, i in info if (v := row[i])}
        if detail:
            kw["devdetail"] = {n: v for n, i in detail if (v := row[i])}
        return Device(dev_id=dev_id, created=now, updated=now, **kw)
    return build


def csv_header(header: list[str]) -> tuple[list[str], dict[str, str]]:
    """The columns a header names (their snake_case names, DevInfo/DevDetail nodes as they
    are) and how the header spelled each one.  A column is named in camelCase or snake_case,
    in any letter case; an unknown one, or one named twice (in either spelling), is a
    ValidationError naming it as written."""
    raw = [h.strip() for h in header]
    if raw and raw[0].startswith("\ufeff"):
        raw[0] = raw[0][1:].strip()
    names: list[str] = []
    spelled: dict[str, str] = {}
    for written in raw:
        low = written.lower()
        name = low if low in CSV_COLUMNS else _BY_CAMEL.get(low, written)
        if name not in CSV_COLUMNS and not name.startswith((DEVINFO_PREFIX, DEVDETAIL_PREFIX)):
            raise ValidationError(
                f"unknown column {written!r} (columns: {', '.join(CSV_CAMEL.values())} — or "
                f"their snake_case names —, {DEVINFO_PREFIX}… and {DEVDETAIL_PREFIX}… nodes)",
                where=written)
        if name in spelled:
            twice = "appears twice" if spelled[name] == written else \
                f"names the same field as {spelled[name]!r}"
            raise ValidationError(f"column {written!r} {twice} in the header", where=written)
        spelled[name] = written
        names.append(name)
    return names, spelled


def _csv_where(where: str | None) -> str | None:
    """A record path of the store (``$.account.client_name``) as the CSV column at fault."""
    if not where or where == "$":
        return None
    parts = where[2:].split(".") if where.startswith("$.") else [where]
    head = parts[0].split("[", 1)[0]
    if head == "account" and len(parts) > 1:
        return parts[1].split("[", 1)[0]
    return head


def _json_where(where: str | None) -> str | None:
    if not where or where == "$":
        return None
    return where[2:] if where.startswith("$.") else where


class DeviceImport:
    """One streamed import: ``feed`` the body as it arrives, then ``finish``; ``close`` in a
    ``finally`` (it waits for a write still in flight when the upload broke off).

    Complete lines are collected a block at a time; every ``chunk`` lines go to
    ``Store.import_devices`` as a generator that parses them (the ``csv`` module, msgspec for
    NDJSON) while the store validates and writes, one chunk in flight while the next one
    arrives.  So at most one parsed record is alive at a time — tens of thousands of Device
    structs held per chunk made the cyclic collector most of an import's time — and memory
    stays bounded by two chunks of lines whatever the size of the upload.  Bad rows are
    counted and the first ``max_errors`` of them (by line) kept; good rows are written."""

    def __init__(self, store: Store, fmt: ImportFormat, *, replace: bool = False,
                 server_id: str = "dmengine", chunk: int = IMPORT_CHUNK,
                 max_errors: int = MAX_ERRORS, row_decoder: Any = None) -> None:
        """``row_decoder``: what decodes an NDJSON line into a Device (``.decode(bytes)``,
        raising msgspec's errors); default: the record's own field names."""
        self.store = store
        self.fmt = fmt
        self.replace = replace
        self.server_id = server_id
        self.chunk = chunk
        self.max_errors = max_errors
        self.result = ImportResult()
        self._buf = bytearray()
        self._line = 0                  # lines consumed so far
        self._skipping = False          # inside a line longer than MAX_LINE
        self._pending: list[Any] = []   # lines not yet handed to the store (str or bytes)
        self._pending_base = 0          # line number before the first pending line
        # store imports not yet collected, oldest first, with the line of each row they got
        self._inflight: collections.deque[tuple[asyncio.Future[ImportReport], list[int]]] = \
            collections.deque()
        self._errors: list[tuple[int, int, RowError]] = []   # max-heap by line (negated)
        self._nerrors = 0
        self._seq = 0
        self._build: Callable[[list[str], float], Device] | None = None
        self._spelled: dict[str, str] = {}   # CSV: column → as the header wrote it
        self._json = row_decoder if row_decoder is not None else msgspec.json.Decoder(Device)

    # --- input ----------------------------------------------------------------------------

    async def feed(self, data: bytes) -> None:
        if self._skipping:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data = data[nl + 1:]
            self._skipping = False
        buf = self._buf
        buf += data
        if len(buf) < BLOCK:
            return
        cut = buf.rfind(b"\n")
        if cut >= 0:
            block = bytes(buf[:cut + 1])
            del buf[:cut + 1]
            self._take(block)
        if len(buf) > MAX_LINE:
            self._skip_line()
            buf.clear()
            self._skipping = True
        if len(self._pending) >= self.chunk:
            await self._flush()

    async def finish(self) -> ImportResult:
        if self._buf and not self._skipping:
            self._take(bytes(self._buf) + b"\n")
        self._buf.clear()
        if self.fmt == "csv" and self._build is None:
            raise ValidationError("the CSV has no header row", where="header")
        await self._flush()
        while self._inflight:
            await self._collect()
        r = self.result
        r.rejected = self._nerrors
        r.errors = [e for _, _, e in sorted(self._errors, key=lambda t: -t[0])]
        r.errors_omitted = r.rejected - len(r.errors)
        return r

    async def close(self) -> None:
        while self._inflight:
            fut, _ = self._inflight.popleft()
            await asyncio.wait([fut])
            if not fut.cancelled():
                fut.exception()     # retrieved: an upload that broke off is not an error here

    def _take(self, block: bytes) -> None:
        """Complete lines (``block`` ends with a newline) join the pending ones; a CSV's
        header is read here, so a bad header fails the request before anything is written."""
        if self.fmt == "csv":
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError:
                text = self._decode_lines(block)
            lines: list[Any] = text.split("\n")
        else:
            lines = block.split(b"\n")
        lines.pop()                     # after the last newline: nothing
        for k, line in enumerate(lines):
            # a line over the limit that came whole in one read: one rejected row, as one
            # that is skipped while its newline is awaited (feed), never parsed
            if len(line) > MAX_LINE // 4 and len(
                    line if isinstance(line, bytes) else line.encode()) > MAX_LINE:
                if self.fmt == "csv" and self._build is None and not any(
                        x.strip() for x in lines[:k]):
                    raise ValidationError(f"the header row is longer than {MAX_LINE} bytes",
                                          where="header")
                lines[k] = "" if self.fmt == "csv" else b""
                self.result.rows += 1
                self._error(self._line + k + 1, None, f"line longer than {MAX_LINE} bytes")
        if not self._pending:
            self._pending_base = self._line
        self._line += len(lines)
        if self.fmt == "csv" and self._build is None:
            self._header(lines)
        self._pending.extend(lines)

    def _header(self, lines: list[str]) -> None:
        for k, line in enumerate(lines):
            if line.strip():
                try:
                    header = next(csv.reader([line], strict=True))
                except csv.Error as exc:
                    raise ValidationError(f"bad header row: {exc}", where="header") from None
                self._build = csv_row_builder(header, self.server_id)
                self._spelled = csv_header(header)[1]
                lines[k] = ""           # read: a blank line for the row parser
                return

    def _skip_line(self) -> None:
        # a CSV whose header is the long line: refused as the header, as when it comes whole
        # in one read (_take) — over HTTP a line that long always comes in several
        if self.fmt == "csv" and self._build is None:
            raise ValidationError(f"the header row is longer than {MAX_LINE} bytes",
                                  where="header")
        self._pending.append("" if self.fmt == "csv" else b"")
        if len(self._pending) == 1:
            self._pending_base = self._line
        self._line += 1
        self.result.rows += 1
        self._error(self._line, None, f"line longer than {MAX_LINE} bytes")

    def _decode_lines(self, block: bytes) -> str:
        """A block with bytes that are not UTF-8: each bad line becomes an error and an
        empty line (so the line numbers stay)."""
        out = []
        for k, raw in enumerate(block.split(b"\n")[:-1]):
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                self.result.rows += 1
                self._error(self._line + k + 1, None, f"not UTF-8: {exc.reason} at byte "
                                                       f"{exc.start}")
                out.append("")
        return "\n".join(out) + "\n"

    # --- parsing: generators the store's import consumes -----------------------------------

    def _ndjson_rows(self, lines: list[bytes], base: int, out: list[int]) -> Iterator[Device]:
        now = time.time()
        decode = self._json.decode
        rows = 0
        for k, line in enumerate(lines):
            if not line or line.isspace():
                continue
            rows += 1
            try:
                dev = decode(line)
            except msgspec.ValidationError as exc:
                self._error(base + k + 1, _json_where(where_of(exc)), str(exc))
                continue
            except msgspec.DecodeError as exc:
                self._error(base + k + 1, None, f"not a JSON object: {exc}")
                continue
            dev.created = now
            dev.updated = now
            out.append(base + k + 1)
            yield dev
        self.result.rows += rows

    def _csv_rows(self, lines: list[str], base: int, out: list[int]) -> Iterator[Device]:
        """A record is one line: a line without a quote is split on commas, one with quotes
        goes through the ``csv`` module on its own (so a stray quote costs its line only)."""
        build = self._build
        assert build is not None
        now = time.time()
        reader = csv.reader
        rows = 0
        for k, line in enumerate(lines):
            if not line or line.isspace():
                continue
            rows += 1
            if line[-1] == "\r":
                line = line[:-1]
            if '"' in line:
                try:
                    row = next(reader((line,), strict=True))
                except csv.Error as exc:
                    self._error(base + k + 1, None, f"not a CSV record: {exc} (a record is "
                                                    f"one line)")
                    continue
            else:
                row = line.split(",")
            try:
                dev = build(row, now)
            except _Bad as bad:
                self._error(base + k + 1, bad.where, bad.message)
                continue
            out.append(base + k + 1)
            yield dev
        self.result.rows += rows

    # --- errors and writes ------------------------------------------------------------------

    def _error(self, line: int, where: str | None, message: str) -> None:
        if self.fmt == "csv" and where is not None:
            # a column as the header spelled it (camelCase when the header did not name it)
            where = self._spelled.get(where) or CSV_CAMEL.get(where, where)
        self._nerrors += 1
        self._seq += 1
        item = (-line, self._seq, RowError(line, where, message))
        heap = self._errors
        if len(heap) < self.max_errors:
            heapq.heappush(heap, item)
        elif line < -heap[0][0]:
            heapq.heapreplace(heap, item)

    async def _flush(self) -> None:
        lines, base = self._pending, self._pending_base
        if not lines:
            return
        self._pending = []
        # two chunks in flight: this one is parsed and validated while the last one is
        # written (the writer thread commits without the GIL); chunks commit in order, so
        # each sees the rows of the one before
        if len(self._inflight) >= 2:
            await self._collect()
        out: list[int] = []
        rows = self._csv_rows(lines, base, out) if self.fmt == "csv" else \
            self._ndjson_rows(lines, base, out)
        self._inflight.append((asyncio.ensure_future(
            self.store.import_devices(rows, replace=self.replace, chunk=len(lines) + 1)), out))

    async def _collect(self) -> None:
        fut, lines = self._inflight[0]
        try:
            rep = await fut
        finally:
            self._inflight.popleft()
        r = self.result
        r.created += rep.created
        r.replaced += rep.replaced
        where = _csv_where if self.fmt == "csv" else _json_where
        for i, w, msg in rep.rejected:
            self._error(lines[i], where(w), msg[8:] if msg.startswith("Device: ") else msg)
