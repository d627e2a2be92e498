"""Structured logs (L0: the standard library only, so every layer may use it).

One event per line, as text or JSON (``dmengine serve --log-format json``), each carrying the
ids of what it is about — ``session``, ``device``, ``task``, ``job`` — without threading them
through every call: the device port's hooks and the scheduler bind them in a context variable
(:func:`bind`, :func:`bound`) and the handler's filter copies them onto every record logged in
that context.  ``extra={"task": ...}`` (see :func:`ids`) names them for one call.

Two things are never written as they are:

* the session: its RespURI token reaches a live session on its own (dmengine/_dmcore.pyx), so
  it is a credential; the log shows :func:`session_label` (a hash prefix) instead, the same
  for every line of the session;
* secrets in a message: :func:`redact` blanks the value after any key that names a password,
  secret, key, nonce, token or signature (``password=…``, ``client_nonce='…'``,
  ``Authorization: Basic …``), in the message and in a traceback.  It is the guard behind the
  rule that no log call is handed a secret in the first place (tests/test_logs.py greps a full
  run's log for every secret it used).

Hot paths bind plain strings (a context variable set is ~0.1 µs); labels and JSON are made
only when a record is actually emitted.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import IO, Any, Iterator, Mapping

__all__ = ["IDS", "bind", "bound", "current", "ids", "session_label", "redact",
           "JsonFormatter", "TextFormatter", "ContextFilter", "setup", "FORMATS", "LEVELS"]

#: the ids a record may carry, in the order the text format shows them
IDS = ("session", "device", "task", "job")
FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")

_EMPTY: Mapping[str, str] = {}
_IDS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("dmengine_log_ids",
                                                                         default=_EMPTY)


def bind(**kw: str | None) -> None:
    """Sets the ids of everything logged from here on in this context, replacing all others
    (a device-port hook binds its session and device on entry; the scheduler binds a task per
    step, each its own asyncio Task).  No reset: a hook may start hand-driven in the
    connection's context and end in a Task of its own, where a Token of the first is refused;
    each hook binds afresh instead."""
    _IDS.set({k: v for k, v in kw.items() if v})


@contextlib.contextmanager
def bound(**kw: str | None) -> Iterator[None]:
    """Adds ids for the ``with`` block and puts back what was bound before (by value, not by
    Token, for the reason :func:`bind` gives)."""
    before = _IDS.get()
    _IDS.set({**before, **{k: v for k, v in kw.items() if v}})
    try:
        yield
    finally:
        _IDS.set(before)


def current() -> Mapping[str, str]:
    """The ids bound now (a read-only view)."""
    return _IDS.get()


def ids(**kw: str | None) -> dict[str, str]:
    """``extra=`` for one log call: ``log.info(..., extra=ids(task=t.task_id, job=t.job_id))``
    (these win over the bound ones)."""
    return {f"dm_{k}": v for k, v in kw.items() if v}


def session_label(token: str) -> str:
    """What a log shows for a session: 12 hex digits of the token's SHA-256 (the token itself
    would let a reader of the log post into the live session)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:12]


# --- redaction ---------------------------------------------------------------------------------

#: key names whose value is a secret: passwords, keys of every kind (API, HMAC, DM account),
#: nonces, tokens, signatures, the Authorization header
_SECRET_KEY = (r"[\w.-]*?(?:pass(?:word|wd|phrase)|pwd|secret|nonce|token|signature|authori[sz]ation"
               r"|api[_-]?key|(?:client|server|hmac|private)[_-]?key|x-api-key|cookie)[\w-]*")
_SECRET = re.compile(
    r"(?P<key>\b" + _SECRET_KEY + r")(?P<sep>['\"]?\s*(?:=|:|\s+is\s+)\s*)"
    r"(?P<val>(?:(?:Basic|Bearer|Digest|Token)\s+)?"
    r"(?:b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\"|[^\s,;&)}\]'\"]+))",
    re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the value after every secret-naming key replaced by ``***``."""
    if not text:
        return text
    return _SECRET.sub(lambda m: f"{m.group('key')}{m.group('sep')}***", text)


# --- records -----------------------------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Copies the bound ids onto each record when it is logged (in the caller's context; the
    formatter may run later).  ``extra=ids(...)`` fields win."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound_now = _IDS.get()
        for k in IDS:
            attr = "dm_" + k
            if getattr(record, attr, None) is None:
                v = bound_now.get(k)
                if v is not None:
                    setattr(record, attr, v)
        return True


def _ids_of(record: logging.LogRecord) -> dict[str, str]:
    out: dict[str, str] = {}
    for k in IDS:
        v = getattr(record, "dm_" + k, None)
        if v is None:
            v = _IDS.get().get(k)          # a handler without the filter: the context now
        if v is not None:
            out[k] = session_label(v) if k == "session" else str(v)
    return out


def _utc(created: float) -> str:
    t = time.gmtime(created)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', t)}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601, ms), ``level``, ``logger``, ``msg``,
    the ids, and ``exc`` (the traceback) when there is one.  ``json.dumps`` escapes newlines,
    so a traceback stays on its line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"time": _utc(record.created), "level": record.levelname.lower(),
                               "logger": record.name, "msg": redact(record.getMessage())}
        doc.update(_ids_of(record))
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            doc["exc"] = redact(record.exc_text)
        if record.stack_info:
            doc["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message [session=… device=… task=… job=…]``; a traceback follows
    on its own lines (text is for people, JSON for shippers)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        tags = " ".join(f"{k}={v}" for k, v in _ids_of(record).items())
        if not tags:
            return line
        head, nl, rest = line.partition("\n")
        return f"{head} [{tags}]{nl}{rest}"

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))


_HANDLER_MARK = "_dmengine_handler"


def setup(fmt: str | None = None, level: str | None = None, *,
          stream: IO[str] | None = None) -> logging.Handler:
    """Sends every logger's records (ours, aiohttp's, asyncio's) to ``stream`` (stderr) in
    ``fmt`` at ``level``; ``None`` takes ``DMENGINE_LOG_FORMAT`` / ``DMENGINE_LOG_LEVEL``,
    else text at info.  Called again, it replaces the handler it installed before."""
    fmt = (fmt or os.environ.get("DMENGINE_LOG_FORMAT") or "text").lower()
    level = (level or os.environ.get("DMENGINE_LOG_LEVEL") or "info").lower()
    if fmt not in FORMATS:
        from .errors import ConfigError
        raise ConfigError(f"log format {fmt!r}: one of {', '.join(FORMATS)}", key="log_format")
    if level not in LEVELS:
        from .errors import ConfigError
        raise ConfigError(f"log level {level!r}: one of {', '.join(LEVELS)}", key="log_level")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
