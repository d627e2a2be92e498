"""Stubs for the sans-IO DM session engine (dmengine/_session.pyx).

Two phases, like h2::

    events = session.receive(msg, now=t, account=acc, hmac_header=h, body=raw)  # may raise ProtocolError
    ...react to events: session.queue(handle, command) ...
    reply = session.next_message(now=t)          # the reply (the same object again for a retransmission)
    more = session.take_events()                 # events made while building it (SessionEnded, ...)

A ProtocolError from receive() carries ``.status`` (the SyncML status to answer with) and
``.events`` (the events of the failure, also returned by take_events()); the session is then
ENDED and ``error_reply(exc)`` builds the answer (Status for the SyncHdr with that code, Alert
1223, Final).
"""
from __future__ import annotations

import enum
from typing import Any, Callable

from dmengine._message import Command, Message
from dmengine.auth import DmAccount as DmAccount
from dmengine.events import Event

DEFAULT_MAX_MSG_SIZE: int            # 16 KiB: what we advertise (MaxMsgSize) and accept
DEFAULT_MAX_OBJ_SIZE: int            # 4 MiB: what we advertise (MaxObjSize) and assemble
DEFAULT_MAX_COMMANDS_PER_MESSAGE: int
DEFAULT_MAX_ITEMS_PER_COMMAND: int
DEFAULT_MAX_AUTH_ATTEMPTS: int
DEFAULT_IDLE_TIMEOUT: float
DEFAULT_MAX_QUEUED: int
DEFAULT_MIN_PEER_MSG_SIZE: int
DEFAULT_MIN_CHUNK: int
DEFAULT_MAX_SESSION_ID_LENGTH: int   # SyncHdr SessionID characters
DEFAULT_MAX_URI_LENGTH: int          # SyncHdr Source/Target LocURI and LocName characters


class SessionState(enum.IntEnum):
    IDLE = 0
    AUTH_PENDING = 1
    OWE_PACKAGE = 2
    OWE_CONTINUATION = 3
    OWE_NEXT = 4
    OWE_CHALLENGE = 5
    OWE_ABORT_ACK = 6
    OWE_AUTH_END = 7
    WAIT_CLIENT = 8
    WAIT_NEXT_REQUEST = 9
    CLIENT_STREAMING = 10
    ENDED = 11


class SessionInput(enum.IntEnum):
    START = 0
    START_PARTIAL = 1
    FINAL = 2
    PARTIAL = 3
    NEXT = 4
    ABORT = 5
    RETRANSMIT = 6
    AUTH_FAIL = 7
    AUTH_EXHAUSTED = 8
    SEND_FINAL = 9
    SEND_PARTIAL = 10
    SEND_END = 11
    SEND_NEXT = 12
    SEND_CHALLENGE = 13
    SERVER_ABORT = 14
    CLOSE = 15


class Action(enum.IntEnum):
    START = 0
    PROCESS = 1
    CHALLENGE = 2
    AUTH_END = 3
    ABORT_ACK = 4
    REPLAY = 5
    SENT = 6
    SERVER_ABORT = 7
    CLOSE = 8


TRANSITIONS: dict[tuple[SessionState, SessionInput], tuple[Action, SessionState]]
"""The state table; a (state, input) pair that is not a key is a ProtocolError (session ENDED)."""


class SessionConfig:
    """Limits and identity (keyword constructor; every limit has a named default)."""
    server_id: str                 # our server identifier (LocName of our Cred, DMAcc ServerID)
    server_uri: str                # Source LocURI of our messages (the URL the device posts to)
    max_msg_size: int              # MaxMsgSize we advertise and accept (receive(body=...) checks it)
    max_obj_size: int              # MaxObjSize we advertise; larger incoming objects get 413
    require_auth: str              # "md5" | "basic" | "hmac" | "none"
    send_server_cred: bool         # MD5 Cred of the server in our SyncHdr until the device says 212
    encoding: str                  # "wbxml" | "xml": default encoding used to measure replies
    encoded_size: Callable[[Message], int] | None   # real size of a reply; default: len(codec.encode(msg))
    verify_ratio: float            # verify with the real encoder when the estimate passes this share of MaxMsgSize;
                                   # 1.0 suits the project's codecs (the estimate is an upper bound of their output),
                                   # lower it for an encoded_size that can exceed the estimate (pretty printers)
    max_commands_per_message: int  # more SyncBody children in one client message -> ProtocolError(413)
    max_items_per_command: int     # more Items in one client command -> Status 413
    max_auth_attempts: int         # failed credential checks before the session ends (auth_failed)
    idle_timeout: float            # expired(now) after this many seconds without a client message
    max_queued: int                # queue() refuses more
    min_peer_msg_size: int         # a device advertising a smaller MaxMsgSize -> ProtocolError(400)
    default_peer_msg_size: int     # limit for our replies until the device sends MaxMsgSize (0: none)
    min_chunk: int                 # smallest large-object chunk placed behind other commands
    status_refs: bool              # TargetRef/SourceRef in our Status for the device's commands
    max_session_id_length: int     # a longer SyncHdr SessionID is refused (400)
    max_uri_length: int            # a longer SyncHdr Source/Target LocURI or LocName is refused
    def __init__(
        self,
        *,
        server_id: str,
        server_uri: str,
        max_msg_size: int = ...,
        max_obj_size: int = ...,
        require_auth: str = "md5",
        send_server_cred: bool = True,
        encoding: str = "wbxml",
        encoded_size: Callable[[Message], int] | None = None,
        verify_ratio: float = 1.0,
        max_commands_per_message: int = ...,
        max_items_per_command: int = ...,
        max_auth_attempts: int = ...,
        idle_timeout: float = ...,
        max_queued: int = ...,
        min_peer_msg_size: int = ...,
        default_peer_msg_size: int = 0,
        min_chunk: int = ...,
        status_refs: bool = True,
        max_session_id_length: int = ...,
        max_uri_length: int = ...,
    ) -> None: ...


class PreparedCommand:
    """A command checked and sized once (prepare()), for queueing to many sessions."""
    @property
    def command(self) -> Command: ...
    @property
    def shared(self) -> bool:
        """True: it goes out as this very object (no Atomic/Sequence inside)."""

def prepare(command: Command) -> PreparedCommand:
    """Checks and sizes ``command`` once; raises CommandRejected like DmSession.queue()."""

class DmSession:
    """The server side of one DM session (no I/O, no clock: pass ``now`` in)."""
    config: SessionConfig
    session_key: str               # the caller's key for this session (e.g. in RespURI)
    resp_uri: str | None           # RespURI put in every message we send
    end_reason: str | None         # set when the session ends (see events.END_REASONS)
    device_id: str | None          # Source LocURI of the device (set by its first message)
    session_id: str | None         # SyncML SessionID
    alert_code: int                # 1200 / 1201 once package 1 was accepted, else 0
    devinfo: dict[str, str] | None # ./DevInfo leaves of package 1, until the reply to it is
                                   # built (then only in the DeviceIdentified event)
    authenticated: bool
    auth_scheme: str | None        # "md5" | "basic" | "hmac" | "none" once authenticated
    username: str | None
    server_authenticated: bool     # the device answered 212 to our Cred
    peer_max_msg_size: int         # the device's MaxMsgSize (0: unknown / no limit)
    peer_max_obj_size: int         # the device's MaxObjSize (0: unknown / no limit)
    last_activity: float
    messages_received: int
    messages_sent: int

    def __init__(
        self,
        config: SessionConfig,
        *,
        session_key: str,
        resp_uri: str | None,
        now: float,
        random_bytes: Callable[[int], bytes] = ...,
        encoding: str | None = None,     # overrides config.encoding for this session
    ) -> None: ...

    @property
    def state(self) -> SessionState: ...
    @property
    def ended(self) -> bool: ...
    @property
    def encoding(self) -> str: ...
    @property
    def pending_handles(self) -> list[Any]:
        """Handles queued but not sent, or sent and not yet answered."""

    def receive(
        self,
        msg: Message,
        *,
        now: float,
        account: DmAccount | None,
        hmac_header: str | None = None,
        body: bytes | None = None,
    ) -> list[Event]:
        """Processes one decoded client message.  Auth failures are events plus a challenge
        reply, not exceptions.  Raises ProtocolError(status=...) for messages that cannot
        belong to the session (bad VerDTD 505 / VerProto 513, wrong SessionID or Source, MsgID
        going backwards, message out of order, too many commands 413, body > max_msg_size 413)."""

    def queue(self, handle: Any, command: Command | PreparedCommand) -> None:
        """Queues Get/Replace/Add/Delete/Copy/Exec/Atomic/Sequence/Alert 1100-1104 (built with
        the model, or prepared once with prepare() to queue to many sessions).  The caller's
        object is never numbered: a plain command goes out as is, numbered by the encoder
        (Message.number_commands), Atomic/Sequence as a numbered copy — so it must not change
        while queued.  ``handle`` must be hashable; it comes back in StatusReceived,
        ResultsReceived, UserAlertAnswered, LargeObjectFailed and CommandNotDelivered.
        Raises CommandRejected."""

    def queue_many(self, pairs: Any) -> None:
        """queue() for each (handle, command) pair, in one call (stops at the first rejection)."""

    def next_message(self, *, now: float) -> Message:
        """The reply to the last received message: SyncHdr Status (+Chal), Status for every
        device command, then queued commands while they fit the device's MaxMsgSize (large
        Add/Replace values are chunked with MoreData), Final when everything went out."""

    def keep_reply_bytes(self, encoded: bytes) -> None:
        """The encoding of the reply next_message()/abort() just returned: the session keeps
        these bytes for a retransmission instead of the Message (a retransmission still gets
        an equal Message from next_message(), decoded from the bytes)."""

    def replay_bytes(self) -> bytes | None:
        """After receive() took a retransmission: the kept bytes to send again (the
        retransmission is then answered; no next_message() call), else None."""

    def take_events(self) -> list[Event]:
        """Events made by next_message(), abort(), close() and a failed receive() since the
        last call (SessionEnded, CommandNotDelivered, ...)."""

    def abort(self, reason: str = ...) -> Message:
        """Alert 1223 + Final (with the Status owed for the last device message); ends the session."""

    def close(self, reason: str = "closed", detail: str = "") -> list[Event]:
        """Ends the session without a message (timeout, shutdown); returns the events."""

    def error_reply(self, exc: BaseException) -> Message:
        """Answer to a message receive() refused: Status ``exc.status`` for its SyncHdr, Alert 1223, Final."""

    def expired(self, now: float) -> bool:
        """True when the device has been silent for longer than config.idle_timeout."""

    def reply_hmac_header(self, body: bytes) -> str | None:
        """x-syncml-hmac value for our encoded reply when the session uses HMAC, else None."""

    @staticmethod
    def _debug_at(config: SessionConfig, state: SessionState | int, *, now: float = 0.0) -> DmSession:
        """Test hook: a session forced into ``state``."""

    def _process_input(self, inp: SessionInput | int) -> SessionState:
        """Test hook: applies the table to one input (no side effect but the state)."""


def ui_alert(
    code: int,
    text: str,
    *,
    choices: Any = (),
    mindt: int | None = None,
    maxdt: int | None = None,
    dr: Any = None,
    maxlen: int | None = None,
    it: str | None = None,
    et: str | None = None,
) -> Command:
    """A UI Alert (1100 display, 1101 confirm, 1102 text input, 1103 single / 1104 multiple
    choice) with its URL-encoded parameter Item, the text Item and one Item per choice."""


def estimate_size(msg: Message, encoding: str = "wbxml") -> int:
    """Upper bound of the encoded size of ``msg`` (the session's cheap estimate)."""
