"""Events a DM session emits (L2).

Small immutable records, h11/h2 style: ``DmSession.receive()`` returns a list of them,
``DmSession.take_events()`` hands over the ones produced while building a reply, aborting or
closing.  The caller (the device port, the broker) reacts to them; the session does no I/O.

Each event class is a ``typing.NamedTuple`` (``__slots__ = ()``, frozen, ~3x cheaper to build
than a frozen dataclass — a package 3 answering 50 commands makes ~70 of them); equality also
compares the class, so ``StatusReceived(...) != ResultsReceived(...)`` even with equal fields.
``isinstance(ev, EVENT_TYPES)`` tells an event from anything else.

``handle`` is whatever object the caller passed to ``DmSession.queue()`` for the command the
event concerns (``None`` for commands the session sent on its own, such as Alert 1225).
"""
from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "DeviceIdentified", "Authenticated", "AuthFailed", "NonceIssued",
    "ServerNonceReceived", "StatusReceived", "ResultsReceived", "UserAlertAnswered",
    "GenericAlert", "ClientEvent", "LargeObjectFailed", "CommandNotDelivered", "SessionEnded",
    "EVENT_TYPES", "Event", "END_REASONS",
]

# Why a session ended (SessionEnded.reason).
END_REASONS = frozenset({
    "completed",            # the server had nothing left and the client's package was final
    "aborted_by_client",    # Alert 1223 from the device
    "aborted_by_server",    # DmSession.abort()
    "auth_failed",          # the device did not authenticate within max_auth_attempts
    "protocol_error",       # receive() raised ProtocolError
    "timeout",              # DmSession.close("timeout") after the idle limit
    "closed",               # DmSession.close() for any other caller reason
})


def _eq(self: tuple, other: object) -> bool:
    return type(self) is type(other) and tuple.__eq__(self, other)  # type: ignore[arg-type]


def _ne(self: tuple, other: object) -> bool:
    return not _eq(self, other)


class DeviceIdentified(NamedTuple):
    """Package 1 accepted: who the device is and what it said about itself."""

    dev_id: str
    devinfo: dict[str, str]      # ./DevInfo leaf name -> value ("DevId", "Man", "Mod", "DmV", "Lang", ...)
    session_id: str              # SyncML SessionID
    alert: int                   # 1200 server-initiated, 1201 client-initiated


class Authenticated(NamedTuple):
    username: str | None
    scheme: str                  # "basic" | "md5" | "hmac" | "none"


class AuthFailed(NamedTuple):
    username: str | None
    scheme: str
    status: int                  # 401 wrong credentials, 407 missing credentials
    reason: str
    side: str = "client"         # "client": the device failed; "server": the device refused our Cred


class NonceIssued(NamedTuple):
    """A new nonce the device must use next: persist it as the account's ``client_nonce``."""

    dev_id: str | None
    nonce: bytes


class ServerNonceReceived(NamedTuple):
    """The device's Chal for us: persist it as the account's ``server_nonce``."""

    dev_id: str | None
    nonce: bytes


class StatusReceived(NamedTuple):
    handle: Any
    cmd: str                     # element name of the command the Status answers
    status: int
    items: list[Any] | None = None   # Status Items as sent (model Items), if any
    target: str | None = None        # first TargetRef of the Status (else the command's target)
    index: int = -1  # type: ignore[assignment]  # position in an Atomic/Sequence, -1 = the command itself (shadows tuple.index)


class ResultsReceived(NamedTuple):
    handle: Any
    items: list[tuple[str | None, str | None, str | None, Any]]   # (uri, format, type, data)


class UserAlertAnswered(NamedTuple):
    handle: Any
    status: int                  # 200 yes/ok, 304 no, 214 cancelled, 408 timeout, 406 no UI, ...
    answers: list[str]           # Status Item Data: text input, chosen item numbers
    alert: int = 0               # the UI alert code (1100..1104)


class GenericAlert(NamedTuple):
    """One Item of an Alert 1226."""

    correlator: str | None
    source: str | None
    type: str | None             # with an optional "Reversed-Domain-Name:" prefix removed
    format: str | None
    mark: str | None
    data: Any


class ClientEvent(NamedTuple):
    """One Item of an Alert 1224."""

    source: str | None
    type: str | None
    format: str | None
    data: Any


class LargeObjectFailed(NamedTuple):
    """A large object from the device could not be assembled (413, 424 or 1225)."""

    handle: Any
    uri: str | None
    status: int
    reason: str


class CommandNotDelivered(NamedTuple):
    """A queued command was never sent, or never answered, before the session ended."""

    handle: Any
    reason: str


class SessionEnded(NamedTuple):
    reason: str                  # one of END_REASONS
    detail: str = ""


EVENT_TYPES = (DeviceIdentified, Authenticated, AuthFailed, NonceIssued, ServerNonceReceived,
               StatusReceived, ResultsReceived, UserAlertAnswered, GenericAlert, ClientEvent,
               LargeObjectFailed, CommandNotDelivered, SessionEnded)
for _cls in EVENT_TYPES:               # equality compares the class too (plain tuples do not)
    setattr(_cls, "__eq__", _eq)
    setattr(_cls, "__ne__", _ne)
    setattr(_cls, "__hash__", tuple.__hash__)
del _cls

Event = (DeviceIdentified | Authenticated | AuthFailed | NonceIssued | ServerNonceReceived
         | StatusReceived | ResultsReceived | UserAlertAnswered | GenericAlert | ClientEvent
         | LargeObjectFailed | CommandNotDelivered | SessionEnded)
