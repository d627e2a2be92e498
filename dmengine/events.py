"""Events a DM session emits (L2).

Small immutable records, h11/h2 style: ``DmSession.receive()`` returns a list of them,
``DmSession.take_events()`` hands over the ones produced while building a reply, aborting or
closing.  The caller (the device port, the broker) reacts to them; the session does no I/O.

Each event class is an immutable extension type (``dmengine._events``: a package 3 answering
50 commands makes ~70 of them, and a free list shared by all event classes builds one in about
half the time a NamedTuple takes).  They behave like the NamedTuples they replaced: positional
or keyword construction with defaults, attributes, iteration and indexing in field order,
``_fields``, ``_asdict()``, hashing, pickling; equality also compares the class, so
``StatusReceived(...) != ResultsReceived(...)`` even with equal fields.
``isinstance(ev, EVENT_TYPES)`` (or ``EventBase``) tells an event from anything else.

``handle`` is whatever object the caller passed to ``DmSession.queue()`` for the command the
event concerns (``None`` for commands the session sent on its own, such as Alert 1225).
``ResultsReceived.items`` is a tuple of ``(uri, format, type, data)`` tuples, one per Item.
"""
from __future__ import annotations

from dmengine._events import (  # compiled: see _events.pyx
    AuthFailed, Authenticated, ClientEvent, CommandNotDelivered, DeviceIdentified, EventBase,
    GenericAlert, LargeObjectFailed, NonceIssued, ResultsReceived, ServerNonceReceived,
    SessionEnded, StatusReceived, UserAlertAnswered,
)

__all__ = [
    "DeviceIdentified", "Authenticated", "AuthFailed", "NonceIssued",
    "ServerNonceReceived", "StatusReceived", "ResultsReceived", "UserAlertAnswered",
    "GenericAlert", "ClientEvent", "LargeObjectFailed", "CommandNotDelivered", "SessionEnded",
    "EVENT_TYPES", "Event", "EventBase", "END_REASONS",
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


EVENT_TYPES = (DeviceIdentified, Authenticated, AuthFailed, NonceIssued, ServerNonceReceived,
               StatusReceived, ResultsReceived, UserAlertAnswered, GenericAlert, ClientEvent,
               LargeObjectFailed, CommandNotDelivered, SessionEnded)

Event = (DeviceIdentified | Authenticated | AuthFailed | NonceIssued | ServerNonceReceived
         | StatusReceived | ResultsReceived | UserAlertAnswered | GenericAlert | ClientEvent
         | LargeObjectFailed | CommandNotDelivered | SessionEnded)
