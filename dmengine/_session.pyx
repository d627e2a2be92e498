# cython: language_level=3
# distutils: libraries = crypto
# (boundscheck, wraparound, initializedcheck and cdivision come from setup.py, so that
#  DMENGINE_DEBUG=1 can turn the checks on; build with `make build`, not bare cythonize)
"""One OMA DM 1.2 session, server side, as a sans-IO state machine (L2).

Two phases, like h2: ``receive(message)`` processes a decoded client message and returns events;
the caller reacts (looks up tasks, ``queue()``s commands); ``next_message()`` builds the reply.

Rule 1 (h11): everything that moves the state lives in ``TRANSITIONS`` below — a table of
``(state, input) -> (action, next_state)``.  An input with no row is a protocol violation: the
session moves to ENDED and ``ProtocolError`` (with the SyncML status to answer) is raised.

Inputs come from two sides:
* the device's messages (START, START_PARTIAL, FINAL, PARTIAL, NEXT, ABORT, RETRANSMIT,
  AUTH_FAIL, AUTH_EXHAUSTED), derived from the message by ``receive()``;
* our own replies (SEND_FINAL, SEND_PARTIAL, SEND_END, SEND_NEXT, SEND_CHALLENGE), derived from
  what ``next_message()`` managed to put in the reply, and the caller (SERVER_ABORT, CLOSE).
"""
cimport cython
from cpython.unicode cimport PyUnicode_GET_LENGTH
from dmengine._message cimport Message, SyncHdr, Command, Item, Meta, Cred, Chal, Element

import base64
import binascii
import enum
import hmac as _hmac
import os
from hashlib import md5 as _md5
from urllib.parse import quote as _url_quote

from dmengine import auth as _auth
from dmengine.auth import DmAccount
from dmengine._account cimport DmAccount as _Account   # the same type, its fields read directly
from dmengine.errors import CommandRejected, DmError, ProtocolError
from dmengine._events cimport (
    new_AuthFailed, new_Authenticated, new_ClientEvent, new_CommandNotDelivered,
    new_DeviceIdentified, new_GenericAlert, new_LargeObjectFailed, new_NonceIssued,
    new_ResultsReceived, new_ServerNonceReceived, new_SessionEnded, new_StatusReceived,
    new_UserAlertAnswered, raw_ResultsReceived, raw_StatusReceived,
)

from cpython.object cimport PyObject, PyTypeObject
from libc.string cimport memcmp, memcpy, memset
from libc.stdlib cimport malloc, free
from cpython.ref cimport Py_INCREF
from cpython.mem cimport PyMem_Realloc

# MD5 and base64 of the digest-auth hot path straight from OpenSSL's libcrypto (the library
# hashlib uses too), without hashlib's object per digest and binascii's keyword call.
cdef extern from "openssl/md5.h":
    unsigned char* MD5(const unsigned char* d, size_t n, unsigned char* md) nogil
cdef extern from "openssl/evp.h":
    int EVP_EncodeBlock(unsigned char* t, const unsigned char* f, int n) nogil
cdef extern from "openssl/crypto.h":
    int CRYPTO_memcmp(const void* a, const void* b, size_t n) nogil

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL
    object PyUnicode_FromStringAndSize(const char* s, Py_ssize_t n)
    object PyBytes_FromStringAndSize(const char* s, Py_ssize_t n)
    char* PyBytes_AS_STRING(object o)
    bint PyUnicode_IS_ASCII(object o)
    const unsigned char* PyUnicode_1BYTE_DATA(object o)
    list PyList_New(Py_ssize_t n)
    tuple PyTuple_New(Py_ssize_t n)
    void PyTuple_SET_ITEM(object p, Py_ssize_t pos, object o)
    PyObject* _list_item "PyList_GET_ITEM"(object p, Py_ssize_t i)       # borrowed
    PyTypeObject* Py_TYPE(PyObject* o)
    void _decref "Py_DECREF"(PyObject* o)
    void _incref "Py_INCREF"(PyObject* o)
    ctypedef struct _ListObj "PyListObject":
        PyObject** ob_item
        Py_ssize_t allocated
    void Py_SET_SIZE(PyObject* o, Py_ssize_t n)
    Py_ssize_t _lsize "PyList_GET_SIZE"(object p)
    Py_ssize_t _ulen "PyUnicode_GET_LENGTH"(PyObject* o)
    bint _uascii "PyUnicode_IS_ASCII"(PyObject* o)
    const void* _udata "PyUnicode_DATA"(PyObject* o)
    Py_ssize_t Py_SIZE(PyObject* o)
    PyObject* _tuple_item "PyTuple_GET_ITEM"(PyObject* p, Py_ssize_t i)  # borrowed

__all__ = ["SessionConfig", "DmAccount", "DmSession", "SessionState", "SessionInput", "Action",
           "TRANSITIONS", "ui_alert", "PreparedCommand", "prepare",
           "DEFAULT_MAX_MSG_SIZE", "DEFAULT_MAX_OBJ_SIZE", "DEFAULT_MAX_COMMANDS_PER_MESSAGE",
           "DEFAULT_MAX_ITEMS_PER_COMMAND", "DEFAULT_MAX_AUTH_ATTEMPTS", "DEFAULT_IDLE_TIMEOUT",
           "DEFAULT_MAX_QUEUED", "DEFAULT_MIN_PEER_MSG_SIZE", "DEFAULT_MAX_SESSION_ID_LENGTH",
           "DEFAULT_MAX_URI_LENGTH"]

# --- limits (named defaults) -------------------------------------------------------------

DEFAULT_MAX_MSG_SIZE = 16 * 1024            # what we advertise (MaxMsgSize) and accept
DEFAULT_MAX_OBJ_SIZE = 4 * 1024 * 1024      # what we advertise (MaxObjSize) and assemble
DEFAULT_MAX_COMMANDS_PER_MESSAGE = 2000     # SyncBody children of one client message
DEFAULT_MAX_ITEMS_PER_COMMAND = 1000
DEFAULT_MAX_AUTH_ATTEMPTS = 3               # failed credentials before the session is ended
DEFAULT_IDLE_TIMEOUT = 300.0                # seconds between client messages
DEFAULT_MAX_QUEUED = 10000                  # commands waiting in one session
DEFAULT_MIN_PEER_MSG_SIZE = 256             # a device advertising less cannot be served
DEFAULT_MIN_CHUNK = 128                     # smallest large-object chunk worth a message slot
# DM SessionIDs are 16-bit numbers (4 hex digits); device ids and server URIs are short.  A
# header field past these is refused before the session keeps a copy of it (or echoes it).
DEFAULT_MAX_SESSION_ID_LENGTH = 64
DEFAULT_MAX_URI_LENGTH = 1024               # Source/Target LocURI and LocName of the SyncHdr

# --- states, inputs, actions, and the table ---------------------------------------------

class SessionState(enum.IntEnum):
    IDLE = 0                # created; no message yet
    AUTH_PENDING = 1        # we challenged; waiting for package 1 again
    OWE_PACKAGE = 2         # the client's package is complete: next_message() starts our package
    OWE_CONTINUATION = 3    # the client asked (1222) for the rest of our package
    OWE_NEXT = 4            # the client's package is incomplete: next_message() says 'Next Message'
    OWE_CHALLENGE = 5       # authentication failed: next_message() sends the challenge
    OWE_ABORT_ACK = 6       # the client aborted (1223): next_message() acknowledges
    OWE_AUTH_END = 7        # authentication failed for good: next_message() sends the last Status
    WAIT_CLIENT = 8         # our package is out (Final): waiting for the client's package
    WAIT_NEXT_REQUEST = 9   # our message without Final is out: waiting for the client's 1222
    CLIENT_STREAMING = 10   # our 'Next Message' response is out: waiting for more of the client's package
    ENDED = 11


class SessionInput(enum.IntEnum):
    START = 0               # client message with Alert 1200/1201 and Final
    START_PARTIAL = 1       # Alert 1200/1201 without Final (package 1 in several messages)
    FINAL = 2               # a message with Final
    PARTIAL = 3             # a message without Final (and without 1222)
    NEXT = 4                # Alert 1222 without Final: the client asks for our next message
    ABORT = 5               # Alert 1223
    RETRANSMIT = 6          # the same MsgID again: answer with the same reply
    AUTH_FAIL = 7           # credentials missing or wrong
    AUTH_EXHAUSTED = 8      # credentials wrong max_auth_attempts times
    SEND_FINAL = 9          # we sent a message with Final and commands
    SEND_PARTIAL = 10       # we sent a message without Final (more to come)
    SEND_END = 11           # we sent a message with Final and no command: the session is over
    SEND_NEXT = 12          # we sent a 'Next Message' response
    SEND_CHALLENGE = 13     # we sent a challenge
    SERVER_ABORT = 14       # the caller called abort()
    CLOSE = 15              # the caller called close() (timeout, shutdown)


class Action(enum.IntEnum):
    START = 0               # authenticate, identify the device, process the body
    PROCESS = 1             # process the body
    CHALLENGE = 2           # new nonce, 401/407 for every command
    AUTH_END = 3            # give up on credentials, end the session
    ABORT_ACK = 4           # client abort: Status for the header and the Alert, end
    REPLAY = 5              # answer a retransmission with the cached reply
    SENT = 6                # a reply went out
    SERVER_ABORT = 7        # Alert 1223 + Final, end
    CLOSE = 8               # end without a message


cdef dict _build_transitions():
    S, I, A = SessionState, SessionInput, Action
    t = {}
    for s in (S.IDLE, S.AUTH_PENDING):
        t[s, I.START] = (A.START, S.OWE_PACKAGE)
        t[s, I.START_PARTIAL] = (A.START, S.OWE_NEXT)
        t[s, I.AUTH_FAIL] = (A.CHALLENGE, S.OWE_CHALLENGE)
        t[s, I.AUTH_EXHAUSTED] = (A.AUTH_END, S.OWE_AUTH_END)
        t[s, I.ABORT] = (A.ABORT_ACK, S.OWE_ABORT_ACK)
    t[S.AUTH_PENDING, I.RETRANSMIT] = (A.REPLAY, S.AUTH_PENDING)
    for s in (S.WAIT_CLIENT, S.CLIENT_STREAMING):
        t[s, I.FINAL] = (A.PROCESS, S.OWE_PACKAGE)
        t[s, I.PARTIAL] = (A.PROCESS, S.OWE_NEXT)
    t[S.WAIT_NEXT_REQUEST, I.NEXT] = (A.PROCESS, S.OWE_CONTINUATION)
    # the device may leave out the 1222 when it has other things to send (PROTOCOL.md §4.1)
    t[S.WAIT_NEXT_REQUEST, I.PARTIAL] = (A.PROCESS, S.OWE_CONTINUATION)
    for s in (S.WAIT_CLIENT, S.WAIT_NEXT_REQUEST, S.CLIENT_STREAMING):
        t[s, I.ABORT] = (A.ABORT_ACK, S.OWE_ABORT_ACK)
        t[s, I.RETRANSMIT] = (A.REPLAY, s)
        t[s, I.AUTH_FAIL] = (A.AUTH_END, S.OWE_AUTH_END)       # HMAC: every message is checked
        t[s, I.AUTH_EXHAUSTED] = (A.AUTH_END, S.OWE_AUTH_END)
    t[S.ENDED, I.RETRANSMIT] = (A.REPLAY, S.ENDED)             # our last reply was lost
    for s in (S.OWE_PACKAGE, S.OWE_CONTINUATION):
        t[s, I.SEND_FINAL] = (A.SENT, S.WAIT_CLIENT)
        t[s, I.SEND_PARTIAL] = (A.SENT, S.WAIT_NEXT_REQUEST)
        t[s, I.SEND_END] = (A.SENT, S.ENDED)
    t[S.OWE_NEXT, I.SEND_NEXT] = (A.SENT, S.CLIENT_STREAMING)
    t[S.OWE_CHALLENGE, I.SEND_CHALLENGE] = (A.SENT, S.AUTH_PENDING)
    t[S.OWE_ABORT_ACK, I.SEND_END] = (A.SENT, S.ENDED)
    t[S.OWE_AUTH_END, I.SEND_END] = (A.SENT, S.ENDED)
    for s in S:
        if s is not S.ENDED:
            t[s, I.CLOSE] = (A.CLOSE, S.ENDED)
            if s is not S.IDLE:
                t[s, I.SERVER_ABORT] = (A.SERVER_ABORT, S.ENDED)
    return t


TRANSITIONS = _build_transitions()
"""``(SessionState, SessionInput) -> (Action, SessionState)``; anything else is a ProtocolError."""

DEF NSTATES = 12
DEF NINPUTS = 16
cdef int _T_NEXT[NSTATES][NINPUTS]
cdef int _T_ACTION[NSTATES][NINPUTS]

cdef void _compile_table():
    cdef int s, i
    for s in range(NSTATES):
        for i in range(NINPUTS):
            _T_NEXT[s][i] = -1
            _T_ACTION[s][i] = -1
    for (s0, i0), (a0, n0) in TRANSITIONS.items():
        _T_NEXT[<int>s0][<int>i0] = <int>n0
        _T_ACTION[<int>s0][<int>i0] = <int>a0

_compile_table()

cdef enum:
    S_IDLE = 0
    S_AUTH_PENDING = 1
    S_OWE_PACKAGE = 2
    S_OWE_CONTINUATION = 3
    S_OWE_NEXT = 4
    S_OWE_CHALLENGE = 5
    S_OWE_ABORT_ACK = 6
    S_OWE_AUTH_END = 7
    S_WAIT_CLIENT = 8
    S_WAIT_NEXT_REQUEST = 9
    S_CLIENT_STREAMING = 10
    S_ENDED = 11

cdef enum:
    I_START = 0
    I_START_PARTIAL = 1
    I_FINAL = 2
    I_PARTIAL = 3
    I_NEXT = 4
    I_ABORT = 5
    I_RETRANSMIT = 6
    I_AUTH_FAIL = 7
    I_AUTH_EXHAUSTED = 8
    I_SEND_FINAL = 9
    I_SEND_PARTIAL = 10
    I_SEND_END = 11
    I_SEND_NEXT = 12
    I_SEND_CHALLENGE = 13
    I_SERVER_ABORT = 14
    I_CLOSE = 15

cdef enum:
    A_START = 0
    A_PROCESS = 1
    A_CHALLENGE = 2
    A_AUTH_END = 3
    A_ABORT_ACK = 4
    A_REPLAY = 5
    A_SENT = 6
    A_SERVER_ABORT = 7
    A_CLOSE = 8

# --- small helpers -----------------------------------------------------------------------

cdef list _NUM = [str(i) for i in range(4096)]

cdef inline bint _is(str a, str b) noexcept:
    """a == b for names: the decoders hand out interned names, so mostly an identity test,
    and a length test rules out most of the rest before any compare.  (Small enough for the
    C compiler to inline at its ~30 call sites, some of them run for every command.)"""
    if a is b:
        return True
    if a is None or b is None or PyUnicode_GET_LENGTH(a) != PyUnicode_GET_LENGTH(b):
        return False
    return _same_text(a, b)


cdef bint _same_text(str a, str b) noexcept:
    """a == b for two strings of the same length."""
    if PyUnicode_IS_ASCII(a) and PyUnicode_IS_ASCII(b):   # (str == str is a library call)
        return memcmp(PyUnicode_1BYTE_DATA(a), PyUnicode_1BYTE_DATA(b), PyUnicode_GET_LENGTH(a)) == 0
    return a == b


cdef inline bint _is_synchdr(str name) noexcept:
    """name == "SyncHdr", deciding on the first letters first ("Replace" has its length)."""
    return _is_synchdr_p(<PyObject*>name)


cdef inline bint _is_synchdr_p(PyObject* name) noexcept:
    """_is_synchdr on a borrowed pointer (no reference counting of the Status's Cmd)."""
    cdef const unsigned char* p
    if name == <PyObject*>None or _ulen(name) != 7 or not _uascii(name):
        return False
    p = <const unsigned char*>_udata(name)
    return p[0] == 83 and p[1] == 121 and memcmp(p, b"SyncHdr", 7) == 0


cdef inline void _swap_lists(list a, list b):
    """Exchanges the items of two lists in O(1) (their arrays change hands: no references
    are taken or dropped)."""
    cdef _ListObj* x = <_ListObj*>a
    cdef _ListObj* y = <_ListObj*>b
    cdef PyObject** items = x.ob_item
    cdef Py_ssize_t allocated = x.allocated, size = Py_SIZE(<PyObject*>a)
    x.ob_item = y.ob_item
    x.allocated = y.allocated
    Py_SET_SIZE(<PyObject*>a, Py_SIZE(<PyObject*>b))
    y.ob_item = items
    y.allocated = allocated
    Py_SET_SIZE(<PyObject*>b, size)


cdef inline list _list_with_room(Py_ssize_t n):
    """An empty list with room for ``n`` items (appended with _push, no reallocation)."""
    cdef list out = PyList_New(n)             # n NULL slots: nothing to release
    Py_SET_SIZE(<PyObject*>out, 0)
    return out


cdef int _make_room(list a, Py_ssize_t n) except -1:
    """Makes room in ``a`` for ``n`` more items (stored by _push, or written directly)."""
    cdef _ListObj* x = <_ListObj*>a
    cdef Py_ssize_t size = Py_SIZE(<PyObject*>a), want = size + n
    cdef PyObject** items
    if want <= x.allocated:
        return 0
    items = <PyObject**>PyMem_Realloc(x.ob_item, want * sizeof(PyObject*))
    if items == NULL:
        raise MemoryError()
    x.ob_item = items
    x.allocated = want
    return 0


cdef inline int _push_new(list a, PyObject* o) except -1:
    """_push for a new reference ``o``: the list takes it over."""
    cdef _ListObj* x = <_ListObj*>a
    cdef Py_ssize_t n = Py_SIZE(<PyObject*>a)
    if n < x.allocated:
        x.ob_item[n] = o
        Py_SET_SIZE(<PyObject*>a, n + 1)
        return 0
    return _append_new(a, o)


cdef int _append_new(list a, PyObject* o) except -1:
    try:
        a.append(<object>o)
    finally:
        _decref(o)
    return 0


cdef inline int _push(list a, object o) except -1:
    """a.append(o) into room made beforehand (list.append would first shrink a list whose
    room is over twice its length, then grow it again)."""
    cdef _ListObj* x = <_ListObj*>a
    cdef Py_ssize_t n = Py_SIZE(<PyObject*>a)
    if n < x.allocated:
        Py_INCREF(o)
        x.ob_item[n] = <PyObject*>o
        Py_SET_SIZE(<PyObject*>a, n + 1)
        return 0
    a.append(o)
    return 0


cdef dict _NUM_BIG = {}        # larger numbers we print again and again (MaxMsgSize, MaxObjSize)

cdef inline str _num(Py_ssize_t i):
    if 0 <= i < 4096:
        return <str>_NUM[i]
    return _num_big(i)


cdef Py_ssize_t _big_a = -1, _big_b = -1     # the last two, checked before the dict
cdef str _big_as = None, _big_bs = None

cdef str _num_big(Py_ssize_t i):
    global _big_a, _big_b, _big_as, _big_bs
    if i == _big_a:
        return _big_as
    if i == _big_b:
        return _big_bs
    cdef object t = _NUM_BIG.get(i)
    if t is None:
        t = str(i)
        if len(_NUM_BIG) < 256:
            _NUM_BIG[i] = t
    _big_b, _big_bs = _big_a, _big_as
    _big_a, _big_as = i, <str>t
    return <str>t


cdef inline long _parse_uint(object s) noexcept:
    """Decimal text -> value; -1 when not a non-negative decimal below 10**15."""
    return _parse_uint_p(<PyObject*>s)


cdef inline long _parse_uint_p(PyObject* s) noexcept:
    """_parse_uint on a borrowed pointer (no reference counting of the text)."""
    cdef Py_ssize_t n, i
    cdef long v = 0
    cdef const unsigned char* p
    cdef unsigned char ch
    if Py_TYPE(s) is <PyTypeObject*>str and _uascii(s):
        n = _ulen(s)
        if 0 < n <= 15:
            p = <const unsigned char*>_udata(s)
            for i in range(n):
                ch = p[i]
                if ch < 48 or ch > 57:
                    return _parse_uint_slow(<object>s)
                v = v * 10 + (ch - 48)
            return v
    return _parse_uint_slow(<object>s)


cdef long _parse_uint_slow(object s) noexcept:
    """_parse_uint for what its fast path does not take (spaces, non-ASCII, bytes)."""
    cdef str t
    cdef Py_ssize_t n
    cdef long v = 0
    cdef Py_UCS4 ch
    if type(s) is not str:
        if isinstance(s, bytes):
            try:
                s = (<bytes>s).decode("ascii")
            except UnicodeDecodeError:
                return -1
        else:
            return -1
    t = <str>s
    n = PyUnicode_GET_LENGTH(t)
    if n == 0 or n > 15:
        t = t.strip()
        n = PyUnicode_GET_LENGTH(t)
        if n == 0 or n > 15:
            return -1
    for ch in t:
        if ch < 48 or ch > 57:
            if ch == 32 or ch == 9 or ch == 10 or ch == 13:
                return _parse_uint(t.strip()) if t.strip() != t else -1
            return -1
        v = v * 10 + (<long>ch - 48)
    return v


cdef inline str _stripped(str s):
    """s.strip(), without the method call when there is nothing to strip (the usual case)."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s)
    cdef const unsigned char* p
    if n and PyUnicode_IS_ASCII(s):
        p = PyUnicode_1BYTE_DATA(s)
        if p[0] > 32 and p[n - 1] > 32:
            return s
    return s.strip()


cdef inline str _text(object v):
    """Data as text (str as is, UTF-8 bytes decoded, else None)."""
    if v is None or type(v) is str:
        return <str>v if v is not None else None
    if isinstance(v, bytes):
        try:
            return (<bytes>v).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


cdef Py_ssize_t _devinfo_at(str uri):
    """Where "DevInfo/" starts in ./DevInfo/..., DevInfo/... or /DevInfo/... (else -1)."""
    cdef Py_ssize_t n, start
    cdef const unsigned char* p
    if uri is None or not PyUnicode_IS_ASCII(uri):
        if uri is not None and (uri.startswith("./DevInfo/") or uri.startswith("DevInfo/")
                                or uri.startswith("/DevInfo/")):
            return uri.index("DevInfo/")
        return -1
    n = PyUnicode_GET_LENGTH(uri)
    p = PyUnicode_1BYTE_DATA(uri)
    start = 0
    if n >= 2 and p[0] == 46 and p[1] == 47:         # "./"
        start = 2
    elif n >= 1 and p[0] == 47:                      # "/"
        start = 1
    if n - start < 8 or memcmp(p + start, b"DevInfo/", 8) != 0:
        return -1
    return start


# the leaf names every package 1 carries, as shared strings: the key of a DevInfo item is
# found by comparing the URI's tail with these (no hashing of the freshly decoded URI)
cdef tuple _DEVINFO_NAMES = ("DevId", "Man", "Mod", "DmV", "Lang")


cdef str _devinfo_key(str uri, Py_ssize_t at):
    cdef Py_ssize_t start = at + 8, n = PyUnicode_GET_LENGTH(uri) - start
    cdef const unsigned char* p
    cdef str name
    if PyUnicode_IS_ASCII(uri):
        p = PyUnicode_1BYTE_DATA(uri) + start
        for o in _DEVINFO_NAMES:
            name = <str>o
            if PyUnicode_GET_LENGTH(name) == n and memcmp(p, PyUnicode_1BYTE_DATA(name), n) == 0:
                return name
    return uri[start:]


cdef inline bint _is_devinfo(str uri):
    return _devinfo_at(uri) >= 0


_RDN_PREFIX = "reversed-domain-name:"

cdef tuple _alert_lo_key(Command c):
    """What the chunks of one generic alert share: code, the chunked Item's Source, Correlator."""
    cdef Item it = <Item?>c.items[len(c.items) - 1] if c.items else None
    return (c.data, it.source if it is not None else None, c.correlator)


cdef str _normalise_alert_type(str t):
    if t is None:
        return None
    t = t.strip()
    if t[:21].lower() == _RDN_PREFIX:
        t = t[21:].strip()
    return t


cdef bint _fast_paths = True            # _status_fast/_results_fast in front of the general path


def _use_fast_paths(bint on):
    """Test hook: with False every Status and Results takes the general path (the fast paths
    must give the same events)."""
    global _fast_paths
    _fast_paths = on


cdef object _INTERNAL = object()      # handle of commands the session sends on its own


DEF _CMDID_ROOM = "4294967295"      # the widest CmdID a size estimate makes room for


@cython.final
@cython.freelist(64)
cdef class _SentMsg:
    """What we sent in one message, by CmdID (entries[k - first]): the queue's own
    ``(handle, PreparedCommand)`` pair for a shared command, else ``(handle, wire command,
    position inside its container)``; None for an id that is not ours.  ``awaiting[k - first]``
    says whether its Status is still to come."""
    cdef Py_ssize_t first
    cdef list entries
    cdef unsigned char* awaiting    # one flag per entry (malloc'd: a parked session stays small)
    cdef Py_ssize_t n_awaiting

    def __dealloc__(self):
        free(self.awaiting)

    cdef int await_all(self, Py_ssize_t n) except -1:
        free(self.awaiting)
        self.awaiting = <unsigned char*>malloc(n if n > 0 else 1)
        if self.awaiting == NULL:
            raise MemoryError()
        memset(self.awaiting, 1, n)
        self.n_awaiting = n
        return 0

    cdef inline tuple at(self, long k):
        k -= self.first
        if k < 0 or k >= len(self.entries):
            return None
        return <tuple>self.entries[k]


cdef inline Command _entry_wire(tuple e):
    w = e[1]
    if type(w) is PreparedCommand:
        return (<PreparedCommand>w).command
    return <Command>w


cdef object _NO_INDEX = -1

cdef inline object _entry_index(tuple e):
    return e[2] if len(e) > 2 else _NO_INDEX


@cython.final
cdef class PreparedCommand:
    """A management command checked and sized once, for queueing to many sessions (the
    template of a campaign): ``DmSession.queue(handle, prepared)`` then costs a list append,
    and a plain command (no Atomic/Sequence) goes out as this very object, numbered by the
    encoder (Message.number_commands) instead of copied per session.  The command must not
    be changed after prepare()."""
    cdef readonly Command command
    cdef Py_ssize_t est_wbxml       # upper bound of its encoded size, CmdIDs included (-1: not yet)
    cdef Py_ssize_t est_xml
    cdef readonly bint shared       # goes out as is (else a numbered copy per message)
    cdef bint bulk                  # shared and answered (no NoResp): placed in runs (_take_run)
    cdef int xml_ok                 # XML can carry its Data: 1 yes, 0 no, -1 not checked yet
    # what the Status/Results of a shared command needs, worked out once
    cdef int ui_alert               # 1100..1104 for a UI alert, else 0
    cdef bint one_chunked_item      # a single Item with MoreData (answered 213 per chunk)
    cdef bint is_get
    cdef str target                 # the first Item's Target

    def __repr__(self):
        return f"PreparedCommand({self.command!r})"

    cdef Py_ssize_t est(self, int enc) except -1:
        """The size estimate in encoding ``enc``, computed on first use."""
        if enc == ENC_XML:
            if self.est_xml < 0:
                self.est_xml = _command_size(self.command, ENC_XML) + \
                    _n_ids(self.command) * _leaf("CmdID", _CMDID_ROOM, ENC_XML)
            return self.est_xml
        if self.est_wbxml < 0:
            self.est_wbxml = _command_size(self.command, ENC_WBXML) + \
                _n_ids(self.command) * _leaf("CmdID", _CMDID_ROOM, ENC_WBXML)
        return self.est_wbxml

    cdef bint fits_xml(self) except -1:
        if self.xml_ok < 0:
            try:
                _check_xml_data(self.command)
                self.xml_ok = 1
            except CommandRejected:
                self.xml_ok = 0
        return self.xml_ok




cdef Py_ssize_t _n_ids(Command c):
    cdef Py_ssize_t n = 1
    if c.commands is not None:
        for sub in c.commands:
            n += _n_ids(<Command?>sub)
    return n


cdef PreparedCommand _prepare(Command command):
    cdef PreparedCommand p = PreparedCommand.__new__(PreparedCommand)
    cdef Command c = command
    _check_command(c, None, 0)
    if (c.cmd_id is not None or c.msg_ref is not None or c.cmd_ref is not None or c.cmd is not None
            or c.target_refs is not None or c.source_refs is not None or c.chal is not None):
        c = _wire_copy(c)            # once here, not per session: only what a command sends
    p.command = c
    p.shared = c.commands is None
    p.bulk = p.shared and not c.no_resp
    if _is(c.name, "Alert"):
        code = _parse_uint(c.data)
        p.ui_alert = code if 1100 <= code <= 1104 else 0
    p.is_get = _is(c.name, "Get")
    if c.items:
        p.target = (<Item?>c.items[0]).target
        p.one_chunked_item = len(c.items) == 1 and (<Item?>c.items[0]).more_data
    p.est_wbxml = -1
    p.est_xml = -1
    p.xml_ok = -1
    return p


def prepare(Command command not None):
    """The command checked and sized once (PreparedCommand), to queue to any number of
    sessions.  Raises CommandRejected for a command a server cannot send."""
    return _prepare(command)


# the event classes, looked up once (not in the module dict per event)
cdef object _b2a = binascii.b2a_base64
cdef object _cmp = _hmac.compare_digest


cdef object _urandom = os.urandom

# Nonces from os.urandom, drawn 4 KiB at a time (one system call per 256 nonces instead of one
# per nonce).  Every nonce is still 16 fresh random bytes, never handed out twice; a forked
# child starts with an empty pool.
DEF _POOL_BYTES = 4096
cdef bytes _pool = b""
cdef Py_ssize_t _pool_pos = 0

cdef bytes _pooled_random(Py_ssize_t n):
    global _pool, _pool_pos
    if _pool_pos + n > len(_pool):
        _pool = _urandom(_POOL_BYTES)
        _pool_pos = 0
    cdef bytes out = PyBytes_FromStringAndSize(PyBytes_AS_STRING(_pool) + _pool_pos, n)
    _pool_pos += n
    return out

def _reset_pool():
    global _pool, _pool_pos
    _pool = b""
    _pool_pos = 0

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)


@cython.final
cdef class _OutLO:
    """A large object we are sending in chunks."""
    cdef object handle
    cdef Command cmd         # the caller's command (one Item)
    cdef object data         # str | bytes
    cdef Py_ssize_t offset
    cdef Py_ssize_t total_units
    cdef str size_text      # Meta Size of the first chunk
    cdef int unit_cost       # bytes per unit (upper bound) in the session's encoding
    cdef int align           # chunk lengths are multiples of this (4 for b64 text, 3 for bytes in XML)


@cython.final
cdef class _InLO:
    """A large object the device is sending us in chunks: the last Item of a Results, or of
    an Alert 1224/1226 (a generic alert with a large Data)."""
    cdef object handle
    cdef tuple key           # Results: (MsgRef, CmdRef) of the Get; Alert: (code, Source, Correlator)
    cdef int alert_code      # 0 for Results
    cdef str correlator
    cdef str mark
    cdef str uri
    cdef str format
    cdef str type
    cdef list parts
    cdef list done_items     # complete items (Results) or their events (Alert) before the chunked one
    cdef long expected       # Meta Size, -1 if absent
    cdef Py_ssize_t received
    cdef bint rejected       # 413 given: drop the rest


# --- size estimates (upper bounds) --------------------------------------------------------

cdef enum:
    ENC_XML = 0
    ENC_WBXML = 1

cdef Py_ssize_t _XML_MSG_OVERHEAD = 260     # prolog, DOCTYPE, <SyncML xmlns>, <SyncBody>, slack
cdef Py_ssize_t _WBXML_MSG_OVERHEAD = 48    # header, public id, charset, string table length, slack
cdef Py_ssize_t _METINF_NS = 22             # ' xmlns="syncml:metinf"'


cdef inline bint _xml_escaped(str s, Py_ssize_t n):
    """An ASCII string holds a character XML escapes (& < > " ' CR)."""
    cdef const unsigned char* p = PyUnicode_1BYTE_DATA(s)
    cdef Py_ssize_t i
    cdef unsigned char ch
    for i in range(n):
        ch = p[i]
        if ch <= 62 and (ch == 38 or ch == 60 or ch == 62 or ch == 34 or ch == 39 or ch == 13):
            return True
    return False


cdef inline Py_ssize_t _str_bytes(str s, int enc):
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s)
    if PyUnicode_IS_ASCII(s):
        if enc == ENC_XML and _xml_escaped(s, n):
            return 6 * n
        return n
    if enc == ENC_XML:
        return 6 * len(s.encode("utf-8", "surrogatepass"))
    return len(s.encode("utf-8", "surrogatepass"))


cdef inline Py_ssize_t _leaf(str tag, str text, int enc):
    """An element with text content (None: nothing)."""
    if text is None:
        return 0
    if enc == ENC_XML:
        return 2 * PyUnicode_GET_LENGTH(tag) + 5 + _str_bytes(text, enc)
    return 2 + 5 + _str_bytes(text, enc)       # tag, STR_I/STR_T + NUL (+ table slack), END


cdef inline Py_ssize_t _open(str tag, int enc):
    if enc == ENC_XML:
        return 2 * PyUnicode_GET_LENGTH(tag) + 5
    return 2


cdef inline Py_ssize_t _empty(str tag, int enc):
    if enc == ENC_XML:
        return PyUnicode_GET_LENGTH(tag) + 3
    return 1


cdef Py_ssize_t _data_size(object data, int enc) except -1:
    cdef Py_ssize_t n
    if data is None:
        return 0
    if type(data) is str:
        return _open("Data", enc) + _str_bytes(<str>data, enc) + (0 if enc == ENC_XML else 5)
    if isinstance(data, bytes):
        n = len(<bytes>data)
        if enc == ENC_XML:
            return _open("Data", enc) + 12 + 4 * ((n + 2) // 3)   # base64 (or CDATA) text
        return _open("Data", enc) + 6 + n                          # OPAQUE + mb_u_int32 length
    if isinstance(data, Element):
        return _open("Data", enc) + 64 + _element_size(<Element>data, enc)
    return _open("Data", enc) + _str_bytes(str(data), enc)


cdef Py_ssize_t _element_size(Element e, int enc) except -1:
    cdef Py_ssize_t n = 2 * (PyUnicode_GET_LENGTH(e.tag) if e.tag is not None else 8) + 5
    if e.xmlns is not None:
        n += PyUnicode_GET_LENGTH(e.xmlns) + 10
    if e.text is not None:
        n += _str_bytes(e.text, ENC_XML)
    if e.children is not None:
        for c in e.children:
            if isinstance(c, Element):
                n += _element_size(<Element>c, enc)
    return n


cdef Py_ssize_t _meta_size(Meta m, int enc) except -1:
    cdef Py_ssize_t n, ns
    if m is None:
        return 0
    ns = _METINF_NS if enc == ENC_XML else 0
    n = _open("Meta", enc) + (0 if enc == ENC_XML else 4)        # SWITCH_PAGE there and back
    if m.format is not None:
        n += _leaf("Format", m.format, enc) + ns
    if m.type is not None:
        n += _leaf("Type", m.type, enc) + ns
    if m.mark is not None:
        n += _leaf("Mark", m.mark, enc) + ns
    if m.size is not None:
        n += _leaf("Size", m.size, enc) + ns
    if m.max_msg_size is not None:
        n += _leaf("MaxMsgSize", m.max_msg_size, enc) + ns
    if m.max_obj_size is not None:
        n += _leaf("MaxObjSize", m.max_obj_size, enc) + ns
    if m.next_nonce is not None:
        n += _leaf("NextNonce", m.next_nonce, enc) + ns
    if m.version is not None:
        n += _leaf("Version", m.version, enc) + ns
    if m.extra is not None:
        n += 8 * len(m.extra) + _str_bytes(repr(m.extra), enc) * 2
    return n


cdef Py_ssize_t _item_size(Item it, int enc) except -1:
    cdef Py_ssize_t n = _open("Item", enc)
    if it.target is not None or it.target_name is not None:
        n += _open("Target", enc) + _leaf("LocURI", it.target, enc) + _leaf("LocName", it.target_name, enc)
    if it.source is not None or it.source_name is not None:
        n += _open("Source", enc) + _leaf("LocURI", it.source, enc) + _leaf("LocName", it.source_name, enc)
    if it.target_parent is not None:
        n += _open("TargetParent", enc) + _leaf("LocURI", it.target_parent, enc)
    if it.source_parent is not None:
        n += _open("SourceParent", enc) + _leaf("LocURI", it.source_parent, enc)
    n += _meta_size(it.meta, enc)
    n += _data_size(it.data, enc)
    if it.more_data:
        n += _empty("MoreData", enc)
    return n


cdef inline Py_ssize_t _refs_size(Command c, int enc) except -1:
    """The TargetRef and SourceRef elements of a Status or Results."""
    cdef Py_ssize_t n = 0
    if c.target_refs is not None:
        for r in c.target_refs:
            n += _leaf("TargetRef", <str>r if type(r) is str else str(r), enc)
    if c.source_refs is not None:
        for r in c.source_refs:
            n += _leaf("SourceRef", <str>r if type(r) is str else str(r), enc)
    return n


cdef Py_ssize_t _command_size(Command c, int enc) except -1:
    cdef Py_ssize_t n = _open(c.name if c.name is not None else "Command", enc)
    n += _leaf("CmdID", c.cmd_id, enc)
    if c.no_resp:
        n += _empty("NoResp", enc)
    n += _leaf("MsgRef", c.msg_ref, enc)
    n += _leaf("CmdRef", c.cmd_ref, enc)
    n += _leaf("Cmd", c.cmd, enc)
    n += _refs_size(c, enc)
    if c.cred is not None:
        n += _open("Cred", enc) + _meta_size(c.cred.meta, enc) + _data_size(c.cred.data, enc)
    if c.chal is not None:
        n += _open("Chal", enc) + _meta_size(c.chal.meta, enc)
    n += _meta_size(c.meta, enc)
    n += _data_size(c.data, enc)
    n += _leaf("Correlator", c.correlator, enc)
    if c.items is not None:
        for it in c.items:
            n += _item_size(<Item?>it, enc)
    if c.commands is not None:
        for sub in c.commands:
            n += _command_size(<Command?>sub, enc)
    return n


cdef Py_ssize_t _status_size(Command s, int enc) except -1:
    """_command_size for the Status commands the session makes (_status(): no Meta, Cred,
    Items or children), without testing what they never hold."""
    cdef Py_ssize_t n
    if s.items is not None or s.meta is not None or s.cred is not None or s.correlator is not None \
            or s.commands is not None or s.no_resp or type(s.data) is not str:
        return _command_size(s, enc)
    n = _open("Status", enc) + _leaf("CmdID", s.cmd_id, enc) + _leaf("MsgRef", s.msg_ref, enc) \
        + _leaf("CmdRef", s.cmd_ref, enc) + _leaf("Cmd", s.cmd, enc) + _leaf("Data", <str>s.data, enc) \
        + _refs_size(s, enc)
    if s.chal is not None:
        n += _open("Chal", enc) + _meta_size(s.chal.meta, enc)
    return n


cdef Py_ssize_t _hdr_size(SyncHdr h, int enc) except -1:
    cdef Py_ssize_t n = _open("SyncHdr", enc)
    n += _leaf("VerDTD", h.ver_dtd, enc) + _leaf("VerProto", h.ver_proto, enc)
    n += _leaf("SessionID", h.session_id, enc) + _leaf("MsgID", h.msg_id, enc)
    n += _open("Target", enc) + _leaf("LocURI", h.target, enc) + _leaf("LocName", h.target_name, enc)
    n += _open("Source", enc) + _leaf("LocURI", h.source, enc) + _leaf("LocName", h.source_name, enc)
    n += _leaf("RespURI", h.resp_uri, enc)
    if h.cred is not None:
        n += _open("Cred", enc) + _meta_size(h.cred.meta, enc) + _data_size(h.cred.data, enc)
    n += _meta_size(h.meta, enc)
    return n + (_XML_MSG_OVERHEAD if enc == ENC_XML else _WBXML_MSG_OVERHEAD)


def estimate_size(Message msg not None, str encoding="wbxml"):
    """Upper bound of the encoded size of ``msg`` (what the session uses before verifying)."""
    cdef int enc = ENC_XML if encoding == "xml" else ENC_WBXML
    cdef Py_ssize_t n = _hdr_size(msg.hdr, enc)
    for c in msg.commands:
        n += _command_size(<Command?>c, enc)
        if msg.number_commands:
            n += _unnumbered(<Command>c) * _leaf("CmdID", _CMDID_ROOM, enc)
    if msg.final:
        n += _empty("Final", enc)
    return n


cdef Py_ssize_t _unnumbered(Command c):
    """How many commands in ``c`` (itself included) have no CmdID of their own."""
    cdef Py_ssize_t n = 1 if c.cmd_id is None else 0
    if c.commands is not None:
        for sub in c.commands:
            n += _unnumbered(<Command?>sub)
    return n


cdef dict _SIZERS = {}

cdef object _resolve_sizer(str encoding):
    """``len(encode(msg))`` with the real codec of the encoding, or None if it is not importable."""
    sizer = _SIZERS.get(encoding, _SIZERS)         # (the dict itself: "not resolved yet")
    if sizer is not _SIZERS:
        return sizer
    return _new_sizer(encoding)


cdef object _new_sizer(str encoding):
    # (apart from _resolve_sizer: a function holding a lambda allocates its closure on every
    # call, and _resolve_sizer runs for every new session)
    sizer = None
    try:
        if encoding == "wbxml":
            from dmengine import _wbxml as codec
        else:
            from dmengine import xmlcodec as codec
        enc = codec.encode
        sizer = lambda m: len(enc(m))
    except ImportError:
        sizer = None
    _SIZERS[encoding] = sizer
    return sizer


# --- configuration -----------------------------------------------------------------------

cdef Meta _MD5_CRED_META = Meta(format="b64", type=_auth.AUTH_MD5)   # shared by every reply
cdef str _AUTH_MD5 = _auth.AUTH_MD5       # read per package 1: module attributes cost a dict lookup
cdef str _AUTH_BASIC = _auth.AUTH_BASIC
cdef Py_ssize_t _NONCE_SIZE = _auth.NONCE_SIZE
cdef tuple _RESYNC_NONCES = _auth.RESYNC_NONCES


cdef class SessionConfig:
    """Limits and identity of the server side of a DM session (keyword constructor)."""

    cdef public str server_id
    cdef public str server_uri
    cdef public Py_ssize_t max_msg_size
    cdef public Py_ssize_t max_obj_size
    cdef public str require_auth
    cdef public bint send_server_cred
    cdef public str encoding
    cdef public object encoded_size
    cdef public double verify_ratio
    cdef public Py_ssize_t max_commands_per_message
    cdef public Py_ssize_t max_items_per_command
    cdef public int max_auth_attempts
    cdef public double idle_timeout
    cdef public Py_ssize_t max_queued
    cdef public Py_ssize_t min_peer_msg_size
    cdef public Py_ssize_t default_peer_msg_size
    cdef public Py_ssize_t min_chunk
    cdef public bint status_refs
    cdef public Py_ssize_t max_session_id_length
    cdef public Py_ssize_t max_uri_length
    cdef Meta _limits                # MaxMsgSize/MaxObjSize of our first header, shared

    def __init__(self, *, str server_id not None, str server_uri not None,
                 Py_ssize_t max_msg_size=DEFAULT_MAX_MSG_SIZE,
                 Py_ssize_t max_obj_size=DEFAULT_MAX_OBJ_SIZE,
                 str require_auth="md5", bint send_server_cred=True,
                 str encoding="wbxml", encoded_size=None, double verify_ratio=1.0,
                 Py_ssize_t max_commands_per_message=DEFAULT_MAX_COMMANDS_PER_MESSAGE,
                 Py_ssize_t max_items_per_command=DEFAULT_MAX_ITEMS_PER_COMMAND,
                 int max_auth_attempts=DEFAULT_MAX_AUTH_ATTEMPTS,
                 double idle_timeout=DEFAULT_IDLE_TIMEOUT,
                 Py_ssize_t max_queued=DEFAULT_MAX_QUEUED,
                 Py_ssize_t min_peer_msg_size=DEFAULT_MIN_PEER_MSG_SIZE,
                 Py_ssize_t default_peer_msg_size=0,
                 Py_ssize_t min_chunk=DEFAULT_MIN_CHUNK,
                 bint status_refs=True,
                 Py_ssize_t max_session_id_length=DEFAULT_MAX_SESSION_ID_LENGTH,
                 Py_ssize_t max_uri_length=DEFAULT_MAX_URI_LENGTH):
        if require_auth not in ("md5", "basic", "hmac", "none"):
            raise ValueError(f"require_auth must be md5, basic, hmac or none, not {require_auth!r}")
        if encoding not in ("xml", "wbxml"):
            raise ValueError(f"encoding must be xml or wbxml, not {encoding!r}")
        if max_msg_size < 256 or max_obj_size < 1 or max_auth_attempts < 1:
            raise ValueError("max_msg_size >= 256, max_obj_size >= 1 and max_auth_attempts >= 1")
        self.server_id = server_id
        self.server_uri = server_uri
        self.max_msg_size = max_msg_size
        self.max_obj_size = max_obj_size
        self.require_auth = require_auth
        self.send_server_cred = send_server_cred
        self.encoding = encoding
        self.encoded_size = encoded_size
        self.verify_ratio = verify_ratio
        self.max_commands_per_message = max_commands_per_message
        self.max_items_per_command = max_items_per_command
        self.max_auth_attempts = max_auth_attempts
        self.idle_timeout = idle_timeout
        self.max_queued = max_queued
        self.min_peer_msg_size = min_peer_msg_size
        self.default_peer_msg_size = default_peer_msg_size
        self.min_chunk = min_chunk
        self.status_refs = status_refs
        self.max_session_id_length = max_session_id_length
        self.max_uri_length = max_uri_length

    cdef Meta _limits_meta(self):
        """The Meta with our MaxMsgSize/MaxObjSize, built once per value and shared by the
        headers of every session (replies are read-only for their users)."""
        cdef Meta m = self._limits
        cdef str mms = _num(self.max_msg_size)
        cdef str mos = _num(self.max_obj_size)
        if m is None or m.max_msg_size != mms or m.max_obj_size != mos:
            m = Meta.__new__(Meta)
            m.max_msg_size = mms
            m.max_obj_size = mos
            self._limits = m
        return m

    def __repr__(self):
        return (f"SessionConfig(server_id={self.server_id!r}, server_uri={self.server_uri!r}, "
                f"max_msg_size={self.max_msg_size}, max_obj_size={self.max_obj_size}, "
                f"require_auth={self.require_auth!r}, encoding={self.encoding!r})")


# --- UI alerts ---------------------------------------------------------------------------

def ui_alert(int code, str text not None, *, choices=(), mindt=None, maxdt=None, dr=None,
             maxlen=None, it=None, et=None):
    """Builds a UI Alert (1100 display, 1101 confirm, 1102 text input, 1103 single choice,
    1104 multiple choice) with its parameter Item (PROTOCOL.md §5.1) for ``DmSession.queue()``."""
    if not 1100 <= code <= 1104:
        raise CommandRejected(f"UI alert code must be 1100..1104, not {code}")
    choices = list(choices)
    if code in (1103, 1104) and not choices:
        raise CommandRejected(f"alert {code} needs at least one choice")
    if code not in (1103, 1104) and choices:
        raise CommandRejected(f"alert {code} takes no choices")
    params = []
    for name, value in (("MINDT", mindt), ("MAXDT", maxdt), ("DR", dr), ("MAXLEN", maxlen),
                        ("IT", it), ("ET", et)):
        if value is None:
            continue
        if name in ("MINDT", "MAXDT", "MAXLEN") and (not isinstance(value, int) or value <= 0):
            raise CommandRejected(f"{name} must be a positive integer, not {value!r}")
        if name == "IT" and (code != 1102 or value not in ("A", "N", "D", "T", "P", "I")):
            raise CommandRejected(f"IT={value!r} is for text input (1102) and one of A N D T P I")
        if name == "ET" and (code != 1102 or value not in ("T", "P")):
            raise CommandRejected(f"ET={value!r} is for text input (1102) and one of T P")
        if name == "MAXLEN" and code != 1102:
            raise CommandRejected("MAXLEN is for text input (1102)")
        if name == "DR" and isinstance(value, (list, tuple)):
            value = "-".join(str(v) for v in value)
        params.append(f"{name}={_url_quote(str(value), safe='-')}")
    items = [Item(data="&".join(params)), Item(data=text)]
    for ch in choices:
        items.append(Item(data=str(ch)))
    return Command(name="Alert", data=str(code), items=items)


_ALLOWED = frozenset({"Get", "Replace", "Add", "Delete", "Copy", "Exec", "Atomic", "Sequence", "Alert"})
_IN_ATOMIC = frozenset({"Add", "Delete", "Copy", "Replace", "Alert", "Sequence", "Exec"})
_IN_SEQUENCE = frozenset({"Add", "Replace", "Delete", "Copy", "Atomic", "Get", "Exec", "Alert"})
_CLIENT_MAY_NOT = frozenset({"Add", "Delete", "Copy", "Exec", "Get", "Atomic", "Sequence"})


# interned names: the codecs and Python source give the same objects, so "is" finds them first
cdef str _N_GET = "Get"
cdef str _N_REPLACE = "Replace"
cdef str _N_ADD = "Add"
cdef str _N_DELETE = "Delete"
cdef str _N_EXEC = "Exec"
cdef str _N_STATUS = "Status"
cdef str _N_RESULTS = "Results"
cdef str _N_ALERT = "Alert"


cdef bint _plain_leaf(Command c):
    """Get/Replace/Add/Delete/Exec (one Item) with Items that all have a Target: valid as is (a fast path;
    False sends the command through the full check)."""
    cdef str name = c.name
    cdef list items
    if not (name is _N_GET or name is _N_REPLACE or name is _N_ADD or name is _N_DELETE or
            name is _N_EXEC):
        return False
    items = c.items
    if not items or c.commands is not None or (name is _N_EXEC and len(items) != 1):
        return False
    for it in items:
        if type(it) is not Item or (<Item>it).target is None:
            return False
    return True


cdef _check_command(Command c, str parent, int depth):
    cdef str name = c.name
    if parent is None and _plain_leaf(c):
        return
    if depth > 8:
        raise CommandRejected("Atomic/Sequence nested deeper than 8")
    if name not in _ALLOWED:
        raise CommandRejected(f"cannot send {name!r} to a device")
    if parent == "Atomic" and name not in _IN_ATOMIC:
        raise CommandRejected(f"{name} is not allowed inside Atomic")
    if parent == "Sequence" and name not in _IN_SEQUENCE:
        raise CommandRejected(f"{name} is not allowed inside Sequence")
    if name == "Atomic" or name == "Sequence":
        if not c.commands:
            raise CommandRejected(f"{name} needs at least one command")
        for sub in c.commands:
            if not isinstance(sub, Command):
                raise CommandRejected(f"{name} children must be Command objects")
            _check_command(<Command?>sub, name, depth + 1)
        return
    if name == "Alert":
        code = _parse_uint(c.data)
        if code < 1100 or code > 1104:
            raise CommandRejected(f"only UI alerts 1100..1104 can be queued, not {c.data!r}")
        need = 3 if code >= 1103 else 2
        if c.items is None or len(c.items) < need:
            raise CommandRejected(f"alert {code} needs at least {need} Items (parameters, text"
                                  f"{', choices' if need == 3 else ''})")
        return
    if not c.items:
        raise CommandRejected(f"{name} needs at least one Item")
    for it in c.items:
        if not isinstance(it, Item):
            raise CommandRejected(f"{name} items must be Item objects")
        if name != "Copy" and (<Item?>it).target is None:
            raise CommandRejected(f"{name} Item needs a Target")
    if name == "Exec" and len(c.items) != 1:
        raise CommandRejected("Exec takes exactly one Item")


cdef _check_xml_data(Command c):
    """XML cannot carry binary that is not UTF-8 (send it as Format b64)."""
    if c.items is not None:
        for it in c.items:
            d = (<Item?>it).data
            if isinstance(d, bytes):
                try:
                    (<bytes>d).decode("utf-8")
                except UnicodeDecodeError:
                    raise CommandRejected("binary Data cannot travel in XML; send it with "
                                          "Format b64") from None
    if c.commands is not None:
        for sub in c.commands:
            _check_xml_data(<Command?>sub)


cdef Command _wire_copy(Command c):
    """A copy of the caller's command we may number (the caller's object stays untouched)."""
    cdef Command w = Command.__new__(Command)
    w.name = c.name
    w.no_resp = c.no_resp
    w.cred = c.cred
    w.meta = c.meta
    w.data = c.data
    w.correlator = c.correlator
    w.items = c.items
    if c.commands is not None:
        w.commands = [_wire_copy(<Command?>sub) for sub in c.commands]
    return w


cdef Py_ssize_t _number(Command w, Py_ssize_t next_id):
    w.cmd_id = _num(next_id)
    next_id += 1
    if w.commands is not None:
        for sub in w.commands:
            next_id = _number(<Command?>sub, next_id)
    return next_id


cdef Command _status(Py_ssize_t cmd_id, str msg_ref, str cmd_ref, str cmd, list trefs, list srefs,
                     str code):
    cdef Command s = Command.__new__(Command)
    s.name = "Status"
    s.cmd_id = _num(cmd_id) if cmd_id > 0 else None
    s.msg_ref = msg_ref
    s.cmd_ref = cmd_ref
    s.cmd = cmd
    s.target_refs = trefs
    s.source_refs = srefs
    s.data = code
    return s


cdef inline Command _placed_wire(tuple entry):
    """The command an entry of a message's ``placed`` list put on the wire."""
    if len(entry) == 2:
        return (<PreparedCommand>entry[1]).command
    return <Command>entry[2]


cdef inline tuple _entry(tuple entry):
    """(handle, original, chunk record) of an entry of a message's ``placed`` list."""
    if len(entry) == 2:
        return (entry[0], entry[1], None)
    return (entry[0], entry[1], entry[3])


cdef Meta _meta_of(Item it, Command c):
    if it.meta is not None:
        return it.meta
    return c.meta


cdef inline str _fmt_of(Item it, Command c):
    if it.meta is not None and it.meta.format is not None:
        return it.meta.format
    if c.meta is not None:
        return c.meta.format
    return None


cdef inline str _type_of(Item it, Command c):
    if it.meta is not None and it.meta.type is not None:
        return it.meta.type
    if c.meta is not None:
        return c.meta.type
    return None


cdef inline str _item_uri(Item it):
    """Where an Item from the device is about: its Source, else its Target."""
    return it.source if it.source is not None else it.target


cdef inline tuple _result_item(Item it, Command c):
    """One ResultsReceived item: (uri, format, type, data), Meta inherited from the command."""
    return (_item_uri(it), _fmt_of(it, c), _type_of(it, c), it.data)


# --- the session -------------------------------------------------------------------------

cdef object _StateOf = SessionState


@cython.final
@cython.freelist(64)                      # a server makes and drops one per device connection
cdef class DmSession:
    """The server side of one DM session.  See the module docstring and _session.pyi."""

    cdef readonly SessionConfig config
    cdef readonly str session_key
    cdef public str resp_uri
    cdef object _random
    cdef int _state
    cdef int _enc
    cdef object _sizer
    cdef readonly str end_reason
    cdef readonly str device_id
    cdef readonly str session_id
    cdef readonly int alert_code
    cdef readonly dict devinfo
    cdef dict _pkg1_info            # DevInfo so far while package 1 spans several messages
    cdef long _in_msg_id
    cdef long _out_msg_id
    cdef str _in_msg_id_text
    cdef SyncHdr _in_hdr
    cdef Message _last_reply
    cdef bytes _last_bytes          # the encoded reply, when the caller gave it (keep_reply_bytes)
    cdef long _last_reply_to
    cdef Py_hash_t _fp_hash         # fingerprint of the last message: hash(body), commands, Final
    cdef Py_ssize_t _fp_ncmd
    cdef int _fp_flags
    cdef bint _replay
    # authentication
    cdef readonly bint authenticated
    cdef readonly str auth_scheme
    cdef readonly str username
    cdef int _auth_failures
    cdef str _hdr_code
    cdef Chal _hdr_chal
    cdef bytes _client_nonce
    cdef object _account
    cdef bytes _server_nonce
    cdef str _server_cred_data
    cdef bytes _server_cred_nonce
    cdef str _cred_name            # the LocName our Cred is for (set by _server_cred)
    cdef readonly bint server_authenticated
    cdef int _server_rejects
    # peer limits
    cdef readonly Py_ssize_t peer_max_msg_size
    cdef readonly Py_ssize_t peer_max_obj_size
    cdef bint _sent_meta
    # outbox and bookkeeping
    cdef list _out_status
    cdef list _queue                # FIFO of (handle, command); items before _qhead are gone
    cdef Py_ssize_t _qhead
    # a run of shared, answered commands queue_many() put into the empty queue, with their
    # summed size estimate: placed whole without looking at each again (valid while the
    # queue is that list at that length and nothing was pushed back to its front)
    cdef list _run_list
    cdef Py_ssize_t _run_len
    cdef Py_ssize_t _run_est
    cdef list _own_cmds
    cdef dict _sent
    cdef _SentMsg _last_sm          # the _sent entry the last Status found, and its MsgRef
    cdef str _last_sm_ref
    cdef Py_ssize_t _pkg_cmds
    cdef _OutLO _out_lo
    cdef _InLO _in_lo
    cdef list _events
    cdef readonly double last_activity
    cdef SyncHdr _err_hdr
    cdef Py_ssize_t _est
    cdef double _scale
    cdef int _stalls
    cdef readonly long messages_received
    cdef readonly long messages_sent

    def __init__(self, SessionConfig config not None, *, str session_key not None, resp_uri=None,
                 double now, random_bytes=os.urandom, encoding=None):
        self.config = config
        self.session_key = session_key
        self.resp_uri = resp_uri
        self._random = random_bytes if random_bytes is not None else _urandom
        self._state = S_IDLE
        enc = encoding if encoding is not None else config.encoding
        if type(enc) is not str or (not _is(<str>enc, "wbxml") and not _is(<str>enc, "xml")):
            raise ValueError(f"encoding must be xml or wbxml, not {enc!r}")
        self._enc = ENC_XML if _is(<str>enc, "xml") else ENC_WBXML
        self._sizer = config.encoded_size if config.encoded_size is not None else _resolve_sizer(enc)
        self.end_reason = None
        self.devinfo = None
        self._in_msg_id = -1
        self._out_msg_id = 0
        self._last_reply_to = -1
        self._out_status = []
        self._queue = []
        self._qhead = 0
        self._own_cmds = None           # made when the session first needs an Alert 1225
        self._sent = {}
        self._events = []
        self.last_activity = now
        self.peer_max_msg_size = config.default_peer_msg_size
        self.peer_max_obj_size = 0

    # -- public read-only views --------------------------------------------------------

    @property
    def state(self):
        return _StateOf(self._state)

    @property
    def ended(self):
        return self._state == S_ENDED

    @property
    def encoding(self):
        return "xml" if self._enc == ENC_XML else "wbxml"

    @property
    def pending_handles(self):
        """Handles queued but not sent, or sent and not yet answered."""
        out = []
        seen = set()
        for h, _c in self._queue[self._qhead:]:
            if h not in seen:
                seen.add(h)
                out.append(h)
        if self._out_lo is not None and self._out_lo.handle not in seen:
            seen.add(self._out_lo.handle)
            out.append(self._out_lo.handle)
        for h in self._awaited_handles():
            if h not in seen:
                seen.add(h)
                out.append(h)
        return out

    def expired(self, double now):
        """True when the device has been silent longer than config.idle_timeout."""
        return self._state != S_ENDED and now - self.last_activity > self.config.idle_timeout

    def take_events(self):
        """Events produced by next_message(), abort() and close() since the last call."""
        ev = self._events
        self._events = []
        return ev

    # -- the table -----------------------------------------------------------------------

    cdef int _lookup(self, int inp, int* next_state) except -1:
        cdef int s = self._state
        cdef int a = _T_ACTION[s][inp]
        if a < 0:
            raise ProtocolError(
                f"{SessionInput(inp).name} is not allowed in state {SessionState(s).name}",
                status=400 if inp <= I_AUTH_EXHAUSTED else 500)
        next_state[0] = _T_NEXT[s][inp]
        return a

    @staticmethod
    def _debug_at(SessionConfig config not None, state, *, double now=0.0):
        """Test hook: a session forced into ``state`` (no device, no history)."""
        cdef DmSession s = DmSession(config, session_key="debug", resp_uri=None, now=now)
        s._state = int(state)
        if s._state == S_ENDED:
            s.end_reason = "closed"
        return s

    def _process_input(self, inp):
        """Test hook: applies the table to ``inp`` alone (no message, no side effect but the
        state).  A missing row ends the session and raises ProtocolError, like receive()."""
        cdef int nxt = -1
        try:
            self._lookup(int(inp), &nxt)
        except ProtocolError:
            self._state = S_ENDED
            if self.end_reason is None:
                self.end_reason = "protocol_error"
            raise
        self._state = nxt
        return _StateOf(nxt)

    # -- receiving -------------------------------------------------------------------------

    def receive(self, Message msg not None, *, double now, account=None, hmac_header=None,
                body=None):
        """Processes one decoded client message; returns the events it caused.

        Raises ProtocolError (``.status`` = the SyncML status to answer with, ``.events`` = the
        events of the failure, among them SessionEnded("protocol_error")) when the message
        cannot be part of this session; error_reply(exc) builds the answer.
        """
        # room for an event per command and a few more: a package 3 makes one per Status/Results
        cdef list ev = _list_with_room(len(msg.commands) + 4 if msg.commands is not None else 4)
        try:
            try:
                self._receive(msg, now, account, hmac_header, body, ev)
            except (TypeError, UnicodeEncodeError) as exc:   # a model object of the wrong class,
                raise ProtocolError(f"malformed message: {exc}", status=400) from exc  # a lone surrogate
        except ProtocolError as exc:
            self._err_hdr = msg.hdr
            if self._state != S_ENDED:
                self._finish("protocol_error", str(exc), ev)
                self._state = S_ENDED
            exc.events = ev                  # the same events are also in take_events()
            self._events.extend(ev)
            raise
        return ev

    cdef _receive(self, Message msg, double now, object account, object hmac_header, object body,
                  list ev):
        cdef SyncHdr h = msg.hdr
        cdef long msg_id
        cdef int inp, action, nxt = -1
        cdef bint has_start = False, has_abort = False, has_next = False
        cdef Command c
        cdef list cmds
        cdef PyObject* cp
        cdef PyObject* np
        cdef Py_ssize_t i
        cdef Py_hash_t fp_hash = 0
        cdef int fp_flags
        cdef Py_ssize_t ncmd
        if h is None:
            raise ProtocolError("message without SyncHdr", status=400)
        if body is not None and len(body) > self.config.max_msg_size:
            raise ProtocolError(f"message of {len(body)} bytes is larger than MaxMsgSize "
                                f"{self.config.max_msg_size}", status=413)
        if h.ver_dtd is None or (not _is(h.ver_dtd, "1.2") and h.ver_dtd.strip() != "1.2"):
            raise ProtocolError(f"VerDTD {h.ver_dtd!r} not supported (need 1.2)", status=505)
        if h.ver_proto is None or (not _is(h.ver_proto, "DM/1.2")
                                   and h.ver_proto.strip().upper() != "DM/1.2"):
            raise ProtocolError(f"VerProto {h.ver_proto!r} not supported (need DM/1.2)", status=513)
        msg_id = _parse_uint(h.msg_id)
        if msg_id < 0:
            raise ProtocolError(f"MsgID {h.msg_id!r} is not a number", status=400)
        if not h.session_id or not h.source:
            raise ProtocolError("SyncHdr needs SessionID and Source", status=400)
        if len(h.session_id) > self.config.max_session_id_length:
            raise ProtocolError(f"SessionID longer than {self.config.max_session_id_length} "
                                "characters", status=400)
        if len(h.source) > self.config.max_uri_length or (
                h.source_name is not None and len(h.source_name) > self.config.max_uri_length) or (
                h.target is not None and len(h.target) > self.config.max_uri_length):
            raise ProtocolError(f"SyncHdr Source, LocName or Target longer than "
                                f"{self.config.max_uri_length} characters", status=400)
        if self.device_id is not None:
            if not _is(h.session_id, self.session_id):
                raise ProtocolError(f"SessionID {h.session_id!r} does not belong to session "
                                    f"{self.session_id!r}", status=400)
            if not _is(h.source, self.device_id):
                raise ProtocolError(f"Source {h.source!r} is not the device of this session",
                                    status=400)
        if msg.commands is None:
            raise ProtocolError("message without SyncBody commands list", status=400)
        ncmd = len(msg.commands)
        if ncmd > self.config.max_commands_per_message:
            raise ProtocolError(f"{ncmd} commands in one message (limit "
                                f"{self.config.max_commands_per_message})", status=413)
        fp_flags = (1 if msg.final else 0) | (2 if body is not None else 0)
        if body is not None:
            fp_hash = hash(body)
        # retransmission of the message we last answered (or are answering)
        if msg_id == self._in_msg_id:
            if fp_flags != self._fp_flags or fp_hash != self._fp_hash or ncmd != self._fp_ncmd:
                raise ProtocolError(f"MsgID {msg_id} reused for a different message", status=400)
            action = self._lookup(I_RETRANSMIT, &nxt)
            if self._last_reply_to != msg_id:
                raise ProtocolError("retransmission before the reply was built", status=500)
            self._replay = True
            self._state = nxt
            self.last_activity = now
            return
        if msg_id < self._in_msg_id:
            raise ProtocolError(f"MsgID {msg_id} is older than {self._in_msg_id}", status=400)
        cmds = msg.commands
        for i in range(ncmd):               # (borrowed: the list holds its commands)
            cp = _list_item(cmds, i)
            if Py_TYPE(cp) is not <PyTypeObject*>Command and not isinstance(<object>cp, Command):
                raise ProtocolError("SyncBody holds something that is not a command", status=400)
            np = <PyObject*>(<Command>cp).name
            if np == <PyObject*>_N_STATUS or np == <PyObject*>_N_RESULTS:
                continue                      # (the decoders' names are the interned ones)
            if _is((<Command>cp).name, _N_ALERT):
                code = _parse_uint((<Command>cp).data)
                if code == 1200 or code == 1201:
                    has_start = True
                elif code == 1222:
                    has_next = True
                elif code == 1223:
                    has_abort = True
        if has_abort:
            inp = I_ABORT
        elif has_start:
            inp = I_START if msg.final else I_START_PARTIAL
        elif has_next and not msg.final:
            inp = I_NEXT
        elif msg.final:
            inp = I_FINAL
        else:
            inp = I_PARTIAL
        # ENDED: only a retransmission is answered (handled above)
        if self._state == S_ENDED:
            self._lookup(inp, &nxt)
        # identity of the session (first message)
        if self.device_id is None and inp != I_ABORT and (inp == I_START or inp == I_START_PARTIAL):
            self.device_id = h.source
            self.session_id = h.session_id
        elif self.device_id is None and inp != I_ABORT:
            self._lookup(inp, &nxt)         # no row: the first message must open the session
        elif self.device_id is None:
            self.device_id = h.source
            self.session_id = h.session_id
        # authentication
        self._hdr_chal = None
        self._hdr_code = "200"
        if inp != I_ABORT:
            if self._state == S_IDLE or self._state == S_AUTH_PENDING:
                if inp == I_START or inp == I_START_PARTIAL:
                    inp = self._authenticate(h, account, hmac_header, body, inp, True, ev)
            elif self.auth_scheme == "hmac" and self._state != S_ENDED:
                inp = self._authenticate(h, account, hmac_header, body, inp, False, ev)
        action = self._lookup(inp, &nxt)
        # the message belongs to the session: remember it
        self._in_msg_id = msg_id
        self._in_msg_id_text = _stripped(h.msg_id)
        self._in_hdr = h
        self._fp_hash = fp_hash
        self._fp_flags = fp_flags
        self._fp_ncmd = ncmd
        self.last_activity = now
        self.messages_received += 1
        if h.meta is not None:
            self._peer_limits(h.meta)
        if action == A_START:
            self._act_start(msg, ev)
        elif action == A_PROCESS:
            if self._pkg1_info is not None:
                self._more_pkg1(msg, ev)
            self._process_body(msg, ev)
        elif action == A_CHALLENGE:
            self._act_challenge(msg, False, ev)
        elif action == A_AUTH_END:
            self._act_challenge(msg, True, ev)
        elif action == A_ABORT_ACK:
            self._process_abort(msg, ev)
            self._finish("aborted_by_client", "Alert 1223 from the device", ev)
        self._state = nxt

    cdef _peer_limits(self, Meta m):
        cdef long v
        if m.max_msg_size is not None:
            v = _parse_uint(m.max_msg_size)
            if v < 0:
                raise ProtocolError(f"MaxMsgSize {m.max_msg_size!r} is not a number", status=400)
            if v < self.config.min_peer_msg_size:
                raise ProtocolError(f"MaxMsgSize {v} is below the {self.config.min_peer_msg_size} "
                                    "bytes this server needs", status=400)
            self.peer_max_msg_size = v
        if m.max_obj_size is not None:
            v = _parse_uint(m.max_obj_size)
            if v < 0:
                raise ProtocolError(f"MaxObjSize {m.max_obj_size!r} is not a number", status=400)
            self.peer_max_obj_size = v

    cdef int _authenticate(self, SyncHdr h, object account, object hmac_header, object body,
                           int inp, bint first, list ev) except -1:
        cdef str require = self.config.require_auth
        cdef bytes nonce
        cdef bytes fresh
        if account is not None:
            self._account = account
            if self._server_nonce is None:
                self._server_nonce = (<_Account>account).server_nonce if type(account) is _Account \
                    else account.server_nonce
        account = self._account
        if self._client_nonce is not None:
            nonce = self._client_nonce
        elif type(account) is _Account:
            nonce = (<_Account>account).client_nonce
        elif account is not None:
            nonce = account.client_nonce
        else:
            nonce = None
        cred = h.cred
        cred_type = None
        cred_data = None
        if cred is not None:
            cred_data = (<Cred>cred).data
            if (<Cred>cred).meta is not None:
                cred_type = (<Cred>cred).meta.type
                fmt = (<Cred>cred).meta.format
                if fmt is not None and not _is(fmt, "b64") and fmt.strip().lower() != "b64":
                    cred_data = None       # DM credentials are always b64
            if cred_type is None and cred_data is not None:
                cred_type = _AUTH_BASIC        # SyncML default Type for Cred
        if _is(require, "none"):
            if first:
                self.authenticated = True
                self.auth_scheme = "none"
                self.username = h.source_name
                ev.append(new_Authenticated(h.source_name, "none", None))
            self._hdr_code = "200"
            return inp
        resync = None
        if (_is(require, "md5") or _is(require, "basic")) and type(account) is _Account \
                and type(cred_data) is str and cred_type is not None \
                and ((<_Account>account).dev_id is None or (<_Account>account).dev_id == h.source) \
                and ((nonce is not None and self._md5_ok(<str>cred_data, cred_type, h.source_name,
                                                         <_Account>account, nonce))
                     or (first and (<_Account>account).resync
                         and (resync := self._resync_nonce(<str>cred_data, cred_type, h.source_name,
                                                           <_Account>account)) is not None)):
            # the common case (a right MD5 digest) without the general check_client path;
            # anything else goes through check_client, which names the failure.  After a
            # re-synchronisation package #0 the digest may use the well-known nonce; we then
            # authenticate ourselves with it too, and the Chal below gives the device a fresh one
            if first:
                self.authenticated = True
                self.auth_scheme = "md5"
                self.username = (<_Account>account).username
                ev.append(new_Authenticated((<_Account>account).username, "md5", resync))
                if resync is not None:
                    self._server_nonce = resync
            self._hdr_code = "212"
            self._issue_nonce(_AUTH_MD5, ev)
            return inp
        if account is not None and account.dev_id is not None and account.dev_id != h.source:
            res = _auth.AuthResult(False, 401, require, h.source_name,
                                   "account belongs to another device")
        else:
            res = _auth.check_client(require, cred_type=cred_type, cred_data=cred_data,
                                     loc_name=h.source_name, account=account, nonce=nonce,
                                     hmac_header=hmac_header, body=body)
        if res.ok:
            if first:
                self.authenticated = True
                self.auth_scheme = res.scheme
                self.username = res.username
                ev.append(new_Authenticated(res.username, res.scheme, None))
            if res.scheme == "none":
                self._hdr_code = "200"
            elif res.scheme == "hmac":
                self._hdr_code = "200"
                self._issue_nonce(_auth.AUTH_MAC, ev)           # a new nonce for every message
            else:
                self._hdr_code = "212"
                self._issue_nonce(_auth.SCHEME_TYPES[res.scheme], ev)   # for the next session
            return inp
        self._auth_failures += 1
        self._hdr_code = _num(res.status)
        ev.append(new_AuthFailed(res.username, res.scheme, int(res.status), res.reason, "client"))
        if self._auth_failures >= self.config.max_auth_attempts:
            return I_AUTH_EXHAUSTED
        return I_AUTH_FAIL

    cdef bint _md5_ok(self, str cred_data, str cred_type, str loc_name, _Account account,
                      bytes nonce) except -1:
        """A syncml:auth-md5 Cred that is right for ``account`` and ``nonce`` (constant-time
        comparisons; K cached on the account, the digest computed for this nonce)."""
        cdef str t = cred_type
        cdef bytes user
        if not _is(t, _AUTH_MD5) and t.strip().lower() != _AUTH_MD5:
            return False
        cdef const char* u
        cdef const char* l
        cdef const char* d
        cdef Py_ssize_t nu, nl, nd, nk, nn
        cdef unsigned char buf[160]
        cdef unsigned char digest[16]
        cdef unsigned char b64[32]
        uname = account.username
        if type(uname) is not str:
            return False
        if loc_name is not None:
            try:
                u = PyUnicode_AsUTF8AndSize(uname, &nu)
                l = PyUnicode_AsUTF8AndSize(loc_name, &nl)
            except UnicodeEncodeError:          # a lone surrogate: no name of ours
                return False
            if nu != nl or CRYPTO_memcmp(u, l, nu) != 0:
                return False
        kc = account._kc                   # DmAccount.client_key()'s cache, read in place
        if kc is not None and (<tuple>kc)[0] is uname and (<tuple>kc)[1] is account.client_secret:
            key = (<tuple>kc)[2]
        else:
            key = account.client_key()
        nk = len(<bytes>key)
        nn = len(nonce)
        if nk + 1 + nn > 160:
            expected = _b2a(_md5(key + b":" + nonce).digest(), newline=False)
            return _cmp(cred_data.strip().encode("ascii", "replace"), expected)
        memcpy(buf, PyBytes_AS_STRING(key), nk)
        buf[nk] = 58                       # ":"
        memcpy(buf + nk + 1, PyBytes_AS_STRING(nonce), nn)
        MD5(buf, nk + 1 + nn, digest)
        EVP_EncodeBlock(b64, digest, 16)   # 24 characters and a NUL
        if not PyUnicode_IS_ASCII(cred_data):
            return False
        d = <const char*>PyUnicode_1BYTE_DATA(cred_data)
        nd = PyUnicode_GET_LENGTH(cred_data)
        while nd > 0 and (d[0] == 32 or d[0] == 9 or d[0] == 10 or d[0] == 13):
            d += 1
            nd -= 1
        while nd > 0 and (d[nd - 1] == 32 or d[nd - 1] == 9 or d[nd - 1] == 10 or d[nd - 1] == 13):
            nd -= 1
        return nd == 24 and CRYPTO_memcmp(d, b64, 24) == 0

    cdef object _resync_nonce(self, str cred_data, str cred_type, str loc_name, _Account account):
        """The re-synchronisation nonce (either reading) ``cred_data`` is the MD5 digest for,
        else None."""
        for n in _RESYNC_NONCES:
            if self._md5_ok(cred_data, cred_type, loc_name, account, <bytes>n):
                return n
        return None

    cdef _issue_nonce(self, str chal_type, list ev):
        if self._random is _urandom:
            fresh_obj = _pooled_random(_NONCE_SIZE)
        else:
            fresh_obj = self._random(_NONCE_SIZE)
        if type(fresh_obj) is not bytes or not 8 <= len(<bytes>fresh_obj) <= 64:
            fresh_obj = _auth.new_nonce(self._random)      # raises with a clear message
        cdef bytes fresh = <bytes>fresh_obj
        self._client_nonce = fresh
        cdef unsigned char b64[96]
        cdef int nb = EVP_EncodeBlock(b64, <const unsigned char*>PyBytes_AS_STRING(fresh),
                                      <int>len(fresh))
        cdef Meta m = Meta.__new__(Meta)
        m.format = "b64"
        m.type = chal_type
        m.next_nonce = PyUnicode_FromStringAndSize(<const char*>b64, nb)
        cdef Chal ch = Chal.__new__(Chal)
        ch.meta = m
        self._hdr_chal = ch
        ev.append(new_NonceIssued(self.device_id, fresh))

    cdef _act_start(self, Message msg, list ev):
        cdef dict info = {}
        self._collect_devinfo(msg, info)
        if msg.final:
            self.devinfo = info
            ev.append(new_DeviceIdentified(self.device_id, info, self.session_id, self.alert_code))
        else:
            # package 1 goes on in more messages: DeviceIdentified, with all of DevInfo, when
            # its last message (Final) arrives
            self._pkg1_info = info
        self._process_body(msg, ev)

    cdef _collect_devinfo(self, Message msg, dict info):
        """The Alert 1200/1201 code and the DevInfo items of Replace commands in ``msg``."""
        cdef Command c
        cdef Item it
        cdef str src
        cdef long code
        cdef Py_ssize_t at
        for obj in msg.commands:
            c = <Command>obj                  # (_receive checked every one)
            if _is(c.name, "Alert") and self.alert_code == 0:
                code = _parse_uint(c.data)
                if code == 1200 or code == 1201:
                    self.alert_code = code
            elif _is(c.name, "Replace") and c.items is not None:
                for o in c.items:
                    it = <Item?>o
                    src = _item_uri(it)
                    at = _devinfo_at(src)
                    if at >= 0:
                        v = _text(it.data)
                        if v is not None:
                            info[_devinfo_key(src, at)] = v

    cdef _more_pkg1(self, Message msg, list ev):
        """A later message of a multi-message package 1: more DevInfo; the last one (Final)
        identifies the device."""
        cdef dict info = self._pkg1_info
        self._collect_devinfo(msg, info)
        if msg.final:
            self._pkg1_info = None
            self.devinfo = info
            ev.append(new_DeviceIdentified(self.device_id, info, self.session_id, self.alert_code))

    cdef _act_challenge(self, Message msg, bint give_up, list ev):
        """Every command gets the header's auth code; a fresh nonce rides in the Chal.  The
        Statuses carry no Item refs: a session that has not authenticated keeps its reply
        (for a retransmission) while it waits for the retry, and refs would let a stranger
        make that reply as large as his message."""
        cdef Command c
        cdef str code = self._hdr_code
        if not give_up:
            self._issue_nonce(_auth.SCHEME_TYPES[self.config.require_auth], ev)
        for obj in msg.commands:
            c = <Command?>obj
            if _is(c.name, "Status") or _is(c.name, "Results") or c.no_resp:
                if _is(c.name, "Status"):
                    self._on_status(c, ev)      # the device may still tell us about our Cred
                continue
            self._out_status.append(_status(0, self._in_msg_id_text, c.cmd_id, c.name, None,
                                            None, code))
        if give_up:
            self._finish("auth_failed", f"{self._auth_failures} failed authentication attempts", ev)

    # -- the body --------------------------------------------------------------------------

    cdef _add_status(self, Command c, str code):
        cdef list trefs = None, srefs = None
        cdef Item it
        cdef Py_ssize_t n
        if self.config.status_refs and c.items is not None:
            n = len(c.items)                 # (room for a ref per Item: no growing)
            for o in c.items:
                it = <Item?>o
                if it.target is not None:
                    if trefs is None:
                        trefs = _list_with_room(n)
                    _push(trefs, it.target)
                if it.source is not None:
                    if srefs is None:
                        srefs = _list_with_room(n)
                    _push(srefs, it.source)
        self._out_status.append(_status(0, self._in_msg_id_text, c.cmd_id, c.name, trefs, srefs, code))

    cdef _process_abort(self, Message msg, list ev):
        """A message with Alert 1223: acknowledged, and nothing else in it acts.  Only an
        authenticated session still takes the Statuses and Results in it, which answer the
        commands we sent that session; a message that opens a session with an abort never
        authenticated, so none of its commands (a Generic Alert, a Chal) may reach the
        services."""
        cdef Command c
        for obj in msg.commands:
            c = <Command>obj                  # (_receive checked every one)
            if _is(c.name, "Status"):
                if self.authenticated:
                    self._on_status(c, ev)
            elif _is(c.name, "Results"):
                if self.authenticated:
                    self._on_results(c, ev)
            elif not c.no_resp:
                # the abort itself is acknowledged; anything beside it was not executed
                self._out_status.append(_status(
                    0, self._in_msg_id_text, c.cmd_id, c.name, None, None,
                    "200" if _is(c.name, "Alert") and _parse_uint(c.data) == 1223 else "215"))

    cdef _process_body(self, Message msg, list ev):
        cdef Command c
        cdef str name
        cdef bint lo_continued = False
        cdef list cmds = msg.commands
        cdef PyObject* cp
        cdef Py_ssize_t i
        for i in range(len(cmds)):
            cp = _list_item(cmds, i)          # (borrowed; _receive checked every one)
            if <PyObject*>(<Command>cp).name == <PyObject*>_N_STATUS:
                # the common case first, without taking references (the decoders' names are
                # the interned ones)
                if not (_fast_paths and self._status_fast(<Command>cp, ev)):
                    self._on_status(<Command>cp, ev)
                continue
            c = <Command>cp
            name = c.name
            if _is(name, "Status"):
                if not (_fast_paths and self._status_fast(c, ev)):
                    self._on_status(c, ev)
                continue
            if self._in_lo is not None and not lo_continued:
                if self._continues_in_lo(c):
                    lo_continued = True
                    if self._in_lo.alert_code:        # the next chunk of a generic alert
                        self._continue_in_lo(c, ev)
                        continue
                else:
                    self._interrupt_in_lo(ev)
            if _is(name, "Results"):
                if not (_fast_paths and self._results_fast(c, ev)):
                    self._on_results(c, ev)
            elif _is(name, "Alert"):
                self._on_alert(c, ev)
            elif _is(name, "Replace"):
                self._on_replace(c)
            elif name in _CLIENT_MAY_NOT:
                self._refuse(c, "405")
            else:
                if not c.no_resp:
                    self._add_status(c, "501")
        if self._in_lo is not None and not lo_continued and msg.final:
            self._interrupt_in_lo(ev)

    cdef _refuse(self, Command c, str code):
        if not c.no_resp:
            self._add_status(c, code)
        if c.commands is not None:
            for sub in c.commands:
                self._refuse(<Command?>sub, code)

    cdef _on_replace(self, Command c):
        cdef Item it
        cdef str code = "200"
        if c.items is None:
            code = "412"
        elif len(c.items) > self.config.max_items_per_command:
            code = "413"
        else:
            for o in c.items:
                it = <Item?>o
                if not _is_devinfo(_item_uri(it)):
                    code = "405"        # the server has no tree the device may change
                    break
        if not c.no_resp:
            self._add_status(c, code)

    cdef _on_alert(self, Command c, list ev):
        cdef long code = _parse_uint(c.data)
        cdef str st = "200"
        cdef Item it
        cdef Meta m
        cdef list evs
        cdef Py_ssize_t i, n
        if code < 0:
            st = "412"
        elif code == 1200 or code == 1201:
            st = "200"
        elif code == 1222 or code == 1223:
            st = "200"
        elif code == 1224 or code == 1226:
            if not c.items:
                st = "412"
            elif len(c.items) > self.config.max_items_per_command:
                st = "413"
            else:
                evs = []
                n = len(c.items)
                for i in range(n):
                    it = <Item?>c.items[i]
                    m = _meta_of(it, c)
                    if it.more_data:
                        if i != n - 1:
                            st = "400"           # only the last Item may be chunked
                            break
                        if code == 1226 and (m is None or m.type is None):
                            st = "412"
                            break
                        # a generic alert with a large Data: its events when the last chunk is in
                        self._start_in_lo(c, _alert_lo_key(c), _INTERNAL, evs, ev, code)
                        return
                    if code == 1226:
                        if m is None or m.type is None or it.data is None:
                            st = "412"           # Type, Format and Data are required (§5.2)
                            break
                        evs.append(new_GenericAlert(c.correlator, it.source,
                                                        _normalise_alert_type(m.type), m.format,
                                                        m.mark, it.data))
                    else:
                        evs.append(new_ClientEvent(it.source, m.type if m is not None else None,
                                               m.format if m is not None else None, it.data))
                if st == "200":
                    ev.extend(evs)
        elif code == 1225:
            if self._out_lo is not None:
                ev.append(new_CommandNotDelivered(self._out_lo.handle,
                                              "the device reported the chunked object incomplete (1225)"))
                self._drop_open(self._out_lo.handle)
                self._out_lo = None
        elif 1100 <= code <= 1104:
            st = "405"                           # UI alerts go to the device, not from it
        else:
            st = "406"
        if not c.no_resp:
            self._add_status(c, st)

    cdef _on_status(self, Command c, list ev):
        cdef long code = _parse_uint(c.data)
        cdef long k
        cdef str cmd_ref
        cdef _SentMsg sm
        cdef Command w
        cdef Item it
        cdef list answers
        cdef int alert
        if code < 0:
            return                               # a Status is never answered; nothing to learn
        cmd_ref = c.cmd_ref
        if cmd_ref is None:
            return
        k = _parse_uint(cmd_ref)
        if k == 0 or _is_synchdr(c.cmd):
            self._on_hdr_status(c, code, ev)
            return
        cdef str msg_ref = c.msg_ref if c.msg_ref is not None else _num(self._out_msg_id)
        if self._last_sm is not None and _is(msg_ref, self._last_sm_ref):
            sm = self._last_sm                   # Statuses come in runs for one message
        else:
            obj = self._sent.get(msg_ref)
            if obj is None:
                return                           # not one of our messages: ignore
            sm = <_SentMsg>obj
            self._last_sm = sm
            self._last_sm_ref = msg_ref
        entry = sm.at(k)
        if entry is None or not sm.awaiting[k - sm.first]:
            return                               # not ours, or answered before: ignore
        sm.awaiting[k - sm.first] = 0
        sm.n_awaiting -= 1
        handle = entry[0]
        if handle is _INTERNAL:
            return
        first = entry[1]
        if type(first) is PreparedCommand and not (<PreparedCommand>first).one_chunked_item \
                and not (<PreparedCommand>first).ui_alert:
            # a shared command's outcome: what it needs was worked out by prepare()
            ev.append(new_StatusReceived(handle, (<PreparedCommand>first).command.name, code,
                           c.items, c.target_refs[0] if c.target_refs else
                           (<PreparedCommand>first).target, _NO_INDEX))
            return
        w = _entry_wire(entry)
        if w.items is not None and len(w.items) == 1 and (<Item?>w.items[0]).more_data:
            if code == 213:                      # a chunk of a large object: not an outcome yet
                return
            if self._out_lo is not None and self._out_lo.handle is handle:
                self._out_lo = None              # the device refused a chunk: stop the object
        if _is(w.name, "Alert"):
            alert = _parse_uint(w.data)
            if 1100 <= alert <= 1104:
                answers = []
                if c.items is not None:
                    for o in c.items:
                        t = _text((<Item?>o).data)
                        if t is not None:
                            answers.append(t)
                ev.append(new_UserAlertAnswered(handle, code, answers, alert))
                return
        if c.target_refs:
            target = c.target_refs[0]
        elif w.items:
            target = (<Item?>w.items[0]).target
        else:
            target = None
        ev.append(new_StatusReceived(handle, w.name, code, c.items, target, _entry_index(entry)))

    cdef PyObject* _last_entry(self, Command c, long k) noexcept:
        """The sent-message entry for CmdRef ``k`` when the command's MsgRef names the message
        the last Status was for (borrowed; NULL otherwise: the general path decides)."""
        cdef PyObject* smp = <PyObject*>self._last_sm
        cdef PyObject* mr = <PyObject*>c.msg_ref
        cdef PyObject* lr = <PyObject*>self._last_sm_ref
        cdef PyObject* ep
        cdef Py_ssize_t i, n
        if smp == <PyObject*>None or mr == <PyObject*>None or lr == <PyObject*>None:
            return NULL
        if mr != lr:                          # MsgRef: a decoded copy of the same digits
            n = _ulen(mr)
            if n != _ulen(lr) or not _uascii(mr) or not _uascii(lr) \
                    or memcmp(_udata(mr), _udata(lr), n) != 0:
                return NULL
        i = k - (<_SentMsg>smp).first
        if i < 0 or i >= _lsize((<_SentMsg>smp).entries):
            return NULL
        ep = _list_item((<_SentMsg>smp).entries, i)
        if ep == <PyObject*>None:
            return NULL
        return ep

    cdef bint _status_fast(self, Command c, list ev) except -1:
        """The common Status: for a shared command (no chunks, no UI alert) of the message
        the last Status was for, answered the first time.  Read through borrowed pointers
        (no reference counting until the event holds its fields); False leaves the Status
        to the general path (_on_status), which decides every other case."""
        cdef long code = _parse_uint_p(<PyObject*>c.data)
        cdef long k
        cdef PyObject* ep
        cdef PyObject* fp
        cdef PyObject* tr
        cdef PyObject* tgt
        cdef PyObject* smp
        cdef object status
        if code < 0 or c.cmd_ref is None:
            return False
        k = _parse_uint_p(<PyObject*>c.cmd_ref)
        if k <= 0 or _is_synchdr_p(<PyObject*>c.cmd):
            return False
        ep = self._last_entry(c, k)
        if ep == NULL:
            return False
        fp = _tuple_item(ep, 1)
        if Py_TYPE(fp) is not <PyTypeObject*>PreparedCommand or _tuple_item(ep, 0) == <PyObject*>_INTERNAL \
                or (<PreparedCommand>fp).one_chunked_item or (<PreparedCommand>fp).ui_alert:
            return False
        smp = <PyObject*>self._last_sm        # (_last_entry found ep through it: not None)
        if not (<_SentMsg>smp).awaiting[k - (<_SentMsg>smp).first]:
            return False                      # answered before: the general path ignores it
        (<_SentMsg>smp).awaiting[k - (<_SentMsg>smp).first] = 0
        (<_SentMsg>smp).n_awaiting -= 1
        tr = <PyObject*>c.target_refs
        if tr != <PyObject*>None and _lsize(<object>tr):
            tgt = _list_item(<object>tr, 0)
        else:
            tgt = <PyObject*>(<PreparedCommand>fp).target
        status = code                         # (an int object: for 200 CPython's cached one)
        # built from borrowed pointers, the new event handed to the list (no reference
        # counting of the fields beyond the event's own)
        _push_new(ev, raw_StatusReceived(_tuple_item(ep, 0), <PyObject*>(<PreparedCommand>fp).command.name,
                                         <PyObject*>status, <PyObject*>c.items, tgt, <PyObject*>_NO_INDEX))
        return True

    cdef bint _results_fast(self, Command c, list ev) except -1:
        """The common Results: for a shared Get of the message the last Status was for, whole
        (no MoreData), no large object from the device in progress.  False leaves it to the
        general path (_on_results)."""
        cdef PyObject* ep
        cdef PyObject* fp
        cdef PyObject* ip = <PyObject*>c.items
        cdef Item it
        cdef tuple items
        cdef Py_ssize_t i, n
        cdef long k
        if self._in_lo is not None or c.cmd_ref is None or ip == <PyObject*>None:
            return False
        n = _lsize(<object>ip)
        if n == 0 or n > self.config.max_items_per_command:
            return False
        for i in range(n):
            if Py_TYPE(_list_item(<object>ip, i)) is not <PyTypeObject*>Item \
                    or (<Item>_list_item(<object>ip, i)).more_data:
                return False
        k = _parse_uint_p(<PyObject*>c.cmd_ref)
        if k <= 0:
            return False
        ep = self._last_entry(c, k)
        if ep == NULL:
            return False
        fp = _tuple_item(ep, 1)
        if Py_TYPE(fp) is not <PyTypeObject*>PreparedCommand or not (<PreparedCommand>fp).is_get:
            return False
        if _tuple_item(ep, 0) == <PyObject*>_INTERNAL:
            return True                       # a Get of our own: nothing to report
        items = PyTuple_New(n)
        for i in range(n):
            it = <Item>_list_item(<object>ip, i)
            t = _result_item(it, c)
            Py_INCREF(t)
            PyTuple_SET_ITEM(items, i, t)
        _push_new(ev, raw_ResultsReceived(_tuple_item(ep, 0), <PyObject*>items))
        return True

    cdef _on_hdr_status(self, Command c, long code, list ev):
        cdef Meta m
        if code == 212:
            self.server_authenticated = True
        elif code == 401 or code == 407:
            self._server_rejects += 1
            self.server_authenticated = False
            ev.append(new_AuthFailed(self.config.server_id, "md5", code,
                                 "the device refused the server credentials", "server"))
        if c.chal is not None and c.chal.meta is not None:
            m = c.chal.meta
            if m.next_nonce is not None:
                try:
                    n = _auth.decode_nonce(m.next_nonce)
                except DmError:
                    return
                self._server_nonce = n
                ev.append(new_ServerNonceReceived(self.device_id, n))

    cdef _on_results(self, Command c, list ev):
        cdef Item it
        cdef tuple items
        cdef Py_ssize_t i, n
        cdef str msg_ref = c.msg_ref if c.msg_ref is not None else _num(self._out_msg_id)
        handle = self._get_handle(msg_ref, c.cmd_ref)
        if c.items is None:
            self._add_status(c, "412")
            return
        if len(c.items) > self.config.max_items_per_command:
            self._add_status(c, "413")
            return
        if self._in_lo is not None and self._in_lo.key == (msg_ref, c.cmd_ref):
            self._continue_in_lo(c, ev)
            return
        n = len(c.items)
        items = PyTuple_New(n)           # filled in order; an unfilled slot is NULL (freed safely)
        for i in range(n):
            it = <Item?>c.items[i]
            if it.more_data:
                if i != n - 1:
                    self._add_status(c, "400")  # only the last Item may be chunked
                    return
                self._start_in_lo(c, (msg_ref, c.cmd_ref), handle, list(items[:i]), ev)
                return
            t = _result_item(it, c)
            Py_INCREF(t)
            PyTuple_SET_ITEM(items, i, t)
        if handle is not _INTERNAL:
            ev.append(new_ResultsReceived(handle, items))

    cdef object _get_handle(self, str msg_ref, str cmd_ref):
        """The handle of the Get a Results answers (_INTERNAL when it is not one of ours)."""
        cdef _SentMsg sm
        if self._last_sm is not None and _is(msg_ref, self._last_sm_ref):
            sm = self._last_sm
        else:
            obj = self._sent.get(msg_ref)
            if obj is None:
                return _INTERNAL
            sm = <_SentMsg>obj
        entry = sm.at(_parse_uint(cmd_ref))
        if entry is None:
            return _INTERNAL
        first = entry[1]
        if type(first) is PreparedCommand:
            if not (<PreparedCommand>first).is_get:
                return _INTERNAL
        elif not _is(_entry_wire(entry).name, "Get"):
            return _INTERNAL
        return entry[0]

    # -- large objects from the device ------------------------------------------------------

    cdef bint _continues_in_lo(self, Command c):
        cdef _InLO lo = self._in_lo
        if lo.alert_code:
            return _is(c.name, "Alert") and lo.key == _alert_lo_key(c)
        if not _is(c.name, "Results"):
            return False
        msg_ref = c.msg_ref if c.msg_ref is not None else _num(self._out_msg_id)
        return lo.key == (msg_ref, c.cmd_ref)

    cdef _start_in_lo(self, Command c, tuple key, object handle, list done, list ev,
                      int alert_code=0):
        cdef Item it = <Item?>c.items[len(c.items) - 1]
        cdef _InLO lo = _InLO.__new__(_InLO)
        cdef Meta m = _meta_of(it, c)
        lo.handle = handle
        lo.key = key
        lo.alert_code = alert_code
        lo.correlator = c.correlator
        lo.mark = m.mark if m is not None else None
        lo.uri = _item_uri(it)
        lo.format = _fmt_of(it, c)
        lo.type = _type_of(it, c)
        lo.parts = []
        lo.done_items = done
        lo.expected = -1
        lo.received = 0
        size_text = it.meta.size if it.meta is not None and it.meta.size is not None else (
            c.meta.size if c.meta is not None else None)
        if size_text is not None:
            lo.expected = _parse_uint(size_text)
            if lo.expected < 0:
                self._add_status(c, "412")
                return
        self._in_lo = lo
        if lo.expected > self.config.max_obj_size:
            lo.rejected = True
            self._add_status(c, "413")
            return
        self._add_chunk(c, it, ev)

    cdef _continue_in_lo(self, Command c, list ev):
        cdef Item it = <Item?>c.items[0]
        cdef _InLO lo = self._in_lo
        if len(c.items) != 1:
            self._add_status(c, "400")
            self._fail_in_lo(400, "a chunk with more than one Item", ev)
            return
        if lo.rejected:
            self._add_status(c, "413")
            if not it.more_data:
                self._fail_in_lo(413, f"object larger than MaxObjSize {self.config.max_obj_size}", ev)
            return
        self._add_chunk(c, it, ev)

    cdef _add_chunk(self, Command c, Item it, list ev):
        cdef _InLO lo = self._in_lo
        data = it.data
        if data is None:
            data = ""
        if isinstance(data, Element):
            self._add_status(c, "415")
            self._fail_in_lo(415, "a nested document cannot be chunked", ev)
            return
        if type(data) is str:
            lo.received += len(<str>data)
        else:
            lo.received += len(data)
        if lo.received > self.config.max_obj_size:
            lo.rejected = True
            self._add_status(c, "413")
            if not it.more_data:
                self._fail_in_lo(413, f"object larger than MaxObjSize {self.config.max_obj_size}", ev)
            return
        lo.parts.append(data)
        if it.more_data:
            self._add_status(c, "213")
            return
        # last chunk: assemble and check the size (PROTOCOL.md §4.3, §12: decoded or b64 length)
        whole = self._assemble(lo.parts)
        if lo.expected >= 0 and not self._size_matches(whole, lo.expected, lo.format):
            self._add_status(c, "424")
            self._fail_in_lo(424, f"object size does not match Meta Size {lo.expected}", ev)
            return
        self._in_lo = None
        if lo.alert_code:
            if not c.no_resp:
                self._add_status(c, "200")
            ev.extend(lo.done_items)
            if lo.alert_code == 1226:
                ev.append(new_GenericAlert(lo.correlator, lo.uri, _normalise_alert_type(lo.type),
                               lo.format, lo.mark, whole))
            else:
                ev.append(new_ClientEvent(lo.uri, lo.type, lo.format, whole))
            return
        lo.done_items.append((lo.uri, lo.format, lo.type, whole))
        if lo.handle is not _INTERNAL:
            ev.append(new_ResultsReceived(lo.handle, tuple(lo.done_items)))

    cdef object _assemble(self, list parts):
        cdef bint all_str = True
        for p in parts:
            if type(p) is not str:
                all_str = False
                break
        if all_str:
            return "".join(parts)
        return b"".join([(<str>p).encode("utf-8") if type(p) is str else bytes(p) for p in parts])

    cdef bint _size_matches(self, object whole, long expected, str fmt):
        cdef bytes raw
        if type(whole) is str:
            if len(<str>whole) == expected:
                return True
            raw = (<str>whole).encode("utf-8")
        else:
            raw = <bytes>whole
        if len(raw) == expected:
            return True
        if fmt is not None and fmt.strip().lower() == "b64":
            try:
                return len(base64.b64decode(raw, validate=False)) == expected
            except (binascii.Error, ValueError):
                return False
        return False

    cdef _fail_in_lo(self, int code, str reason, list ev):
        cdef _InLO lo = self._in_lo
        self._in_lo = None
        if lo is not None and lo.handle is not _INTERNAL:
            ev.append(new_LargeObjectFailed(lo.handle, lo.uri, code, reason))

    cdef _interrupt_in_lo(self, list ev):
        """A new command before the object was complete: Alert 1225 naming it (§4.3 rule 6)."""
        cdef _InLO lo = self._in_lo
        cdef Command a = Command.__new__(Command)
        a.name = "Alert"
        a.data = "1225"
        a.items = [Item(source=lo.uri)] if lo.uri is not None else None
        if self._own_cmds is None:
            self._own_cmds = []
        self._own_cmds.append(a)
        self._fail_in_lo(1225, "the device started something else before the last chunk", ev)

    # -- queueing --------------------------------------------------------------------------

    def queue(self, handle, command):
        """Queues a management command (Command or PreparedCommand) for the device;
        ``handle`` (hashable) comes back in the events about it.  Raises CommandRejected for
        commands a server cannot send."""
        self._queue_one(handle, command, None)

    def queue_many(self, pairs):
        """queue() for each ``(handle, command)`` of ``pairs`` (stops at the first rejection)."""
        cdef Py_ssize_t i, n, c, total = 0
        cdef PyObject* pp
        cdef PyObject* pc
        cdef PyTypeObject* ph
        cdef bint xml = self._enc == ENC_XML, run
        if type(pairs) is list and self._state != S_ENDED and \
                len(self._queue) - self._qhead + len(<list>pairs) <= self.config.max_queued:
            # a campaign's prepared pairs: checked here, then taken in one extend
            n = len(<list>pairs)
            run = len(self._queue) == 0       # into an empty queue: may become a bulk run
            for i in range(n):          # borrowed pointers: the list holds what is checked
                pp = _list_item(pairs, i)
                if Py_TYPE(pp) is not <PyTypeObject*>tuple or Py_SIZE(pp) != 2:
                    break
                ph = Py_TYPE(_tuple_item(pp, 0))
                pc = _tuple_item(pp, 1)
                if Py_TYPE(pc) is not <PyTypeObject*>PreparedCommand \
                        or (ph is not <PyTypeObject*>int and ph is not <PyTypeObject*>str) \
                        or (xml and (<PreparedCommand>pc).xml_ok != 1
                            and not (<PreparedCommand>pc).fits_xml()):
                    break
                if run:
                    if not (<PreparedCommand>pc).bulk:
                        run = False
                    else:
                        c = (<PreparedCommand>pc).est_xml if xml else (<PreparedCommand>pc).est_wbxml
                        if c < 0:
                            c = (<PreparedCommand>pc).est(self._enc)
                        total += c + 1
            else:
                self._queue.extend(<list>pairs)
                if run and n:
                    self._run_list = self._queue
                    self._run_len = n
                    self._run_est = total
                else:
                    self._run_list = None
                return
        for pair in pairs:
            if type(pair) is tuple and len(<tuple>pair) == 2:
                self._queue_one((<tuple>pair)[0], (<tuple>pair)[1], <tuple>pair)
            else:
                handle, command = pair
                self._queue_one(handle, command, None)

    cdef _queue_one(self, object handle, object command, tuple pair):
        cdef PreparedCommand p
        if self._state == S_ENDED:
            # (not the session key: it is the RespURI token that alone reaches a live session,
            # and error texts end up in logs and task causes)
            raise CommandRejected(f"the session has ended ({self.end_reason})", handle=handle)
        if len(self._queue) - self._qhead >= self.config.max_queued:
            raise CommandRejected(f"more than {self.config.max_queued} commands queued",
                                  handle=handle)
        if type(handle) is not int and type(handle) is not str:
            try:
                hash(handle)
            except TypeError:
                raise CommandRejected("handle must be hashable", handle=None) from None
        if type(command) is PreparedCommand:
            p = <PreparedCommand>command
        elif isinstance(command, Command):
            try:
                p = _prepare(<Command>command)
            except CommandRejected as exc:
                exc.handle = handle
                raise
            pair = None
        else:
            raise CommandRejected("queue takes a Command or a PreparedCommand", handle=handle)
        if self._enc == ENC_XML and not p.fits_xml():
            raise CommandRejected("binary Data cannot travel in XML; send it with Format b64",
                                  handle=handle)
        self._queue.append(pair if pair is not None else (handle, p))
        self._run_list = None

    # -- building replies --------------------------------------------------------------------

    cdef SyncHdr _reply_hdr(self):
        cdef SyncHdr h = SyncHdr.__new__(SyncHdr)
        cdef Meta m
        cdef Cred cr
        self._out_msg_id += 1
        h.ver_dtd = "1.2"
        h.ver_proto = "DM/1.2"
        h.session_id = self.session_id
        h.msg_id = _num(self._out_msg_id)
        h.target = self.device_id
        h.source = self.config.server_uri
        h.resp_uri = self.resp_uri
        if self.config.send_server_cred and not self.server_authenticated:
            data = self._server_cred()
            if data is not None:
                cr = Cred.__new__(Cred)
                cr.meta = _MD5_CRED_META
                cr.data = data
                h.cred = cr
                h.source_name = self._cred_name
        if not self._sent_meta:
            h.meta = self.config._limits_meta()
            self._sent_meta = True
        return h

    cdef str _server_name(self):
        acc = self._account
        if acc is not None and acc.server_id:
            return acc.server_id
        return self.config.server_id

    cdef str _server_cred(self):
        """The Data of our Cred for the device (None without a server secret); sets
        _cred_name, the name it is for (the Cred's LocName)."""
        acc = self._account
        if acc is None:
            return None
        nonce = self._server_nonce if self._server_nonce is not None else b""
        if type(acc) is _Account:               # cached on the account, per nonce
            secret = (<_Account>acc).server_secret
            if secret is None and (<_Account>acc)._sk is None:
                return None
            sid = (<_Account>acc).server_id
            name = sid if sid else self.config.server_id
            self._cred_name = name
            sc = (<_Account>acc)._sc            # server_cred_for()'s cache, read in place
            if sc is not None and (<tuple>sc)[1] is secret \
                    and (<tuple>sc)[0] == name and (<tuple>sc)[2] == nonce:
                return (<tuple>sc)[3]
            return (<_Account>acc).server_cred_for(name, nonce)
        if acc.server_secret is None:
            return None
        self._cred_name = self._server_name()
        if self._server_cred_data is None or self._server_cred_nonce != nonce:
            self._server_cred_data = _auth.server_cred(self._cred_name, acc.server_secret, nonce)
            self._server_cred_nonce = nonce
        return self._server_cred_data

    cdef Command _hdr_status(self, Py_ssize_t cmd_id):
        cdef SyncHdr h = self._in_hdr
        cdef Command s = _status(cmd_id, self._in_msg_id_text, "0", "SyncHdr",
                                 [h.target] if h.target is not None else None,
                                 [h.source] if h.source is not None else None,
                                 self._hdr_code)
        s.chal = self._hdr_chal
        return s

    def reply_hmac_header(self, bytes body not None):
        """The x-syncml-hmac header value for our encoded reply when the session uses HMAC
        (server credentials and the device's nonce for us), else None."""
        if self.auth_scheme != "hmac":
            return None
        acc = self._account
        if acc is None:
            return None
        nonce = self._server_nonce if self._server_nonce is not None else b""
        name = self._server_name()
        if acc.server_secret is not None:
            return _auth.format_hmac_header(name, _auth.hmac_mac(name, acc.server_secret, nonce, body))
        key = acc.server_key() if type(acc) is _Account else None
        if key is None:
            return None
        return _auth.format_hmac_header(name, _auth.hmac_mac_key(key, nonce, body))

    def next_message(self, *, double now):
        """The reply to the last received message (the same object again for a retransmission)."""
        cdef int st = self._state
        cdef int inp, nxt = -1
        cdef Message m
        if self._replay:
            self._replay = False
            return self._reply_again()
        if st != S_OWE_PACKAGE and st != S_OWE_CONTINUATION and st != S_OWE_NEXT and \
                st != S_OWE_CHALLENGE and st != S_OWE_ABORT_ACK and st != S_OWE_AUTH_END:
            if self._last_reply is not None or self._last_bytes is not None:
                return self._reply_again()
            raise ProtocolError(f"no reply owed in state {SessionState(st).name}", status=500)
        if st == S_OWE_PACKAGE or st == S_OWE_CONTINUATION:
            if st == S_OWE_PACKAGE:
                self._pkg_cmds = 0
            m = self._build(True)
            if not m.final:
                inp = I_SEND_PARTIAL
            elif self._pkg_cmds == 0:
                inp = I_SEND_END
            else:
                inp = I_SEND_FINAL
        elif st == S_OWE_NEXT:
            m = self._build(False)
            inp = I_SEND_NEXT
        else:
            m = self._build_all(st == S_OWE_CHALLENGE)
            inp = I_SEND_CHALLENGE if st == S_OWE_CHALLENGE else I_SEND_END
        self._lookup(inp, &nxt)
        self._state = nxt
        self._last_reply = m
        self._last_bytes = None
        self._last_reply_to = self._in_msg_id
        self._in_hdr = None             # its Status is in the reply; a parked session stays small
        self.devinfo = None             # in the DeviceIdentified event
        if self._qhead >= len(self._queue) and self._qhead:
            self._queue = []            # what went out is in _sent, not in the queue
            self._qhead = 0
        self.messages_sent += 1
        self.last_activity = now
        if inp == I_SEND_END and self.end_reason is None:
            self._finish("completed", "", self._events)
        return m

    cdef Message _reply_again(self):
        """The last reply again (decoded from its bytes when the caller kept only those)."""
        if self._last_reply is None and self._last_bytes is not None:
            if self._enc == ENC_WBXML:
                from dmengine import _wbxml as codec
            else:
                from dmengine import xmlcodec as codec
            return codec.decode(self._last_bytes)
        return self._last_reply

    def keep_reply_bytes(self, bytes encoded not None):
        """Hands the session the encoding of the reply next_message()/abort() just returned.
        The session then keeps these bytes for a retransmission instead of the Message (a
        parked session holds a few hundred bytes rather than the reply's model)."""
        if self._last_reply is None and self._last_bytes is None:
            raise ValueError("no reply to keep")
        self._last_bytes = encoded
        self._last_reply = None

    def replay_bytes(self):
        """After receive() took a retransmission: the kept bytes of the reply to send again
        (and the retransmission counts as answered), else None (call next_message())."""
        if self._replay and self._last_bytes is not None:
            self._replay = False
            return self._last_bytes
        return None

    cdef Message _new_reply(self):
        cdef Message m = Message.__new__(Message)
        m.number_commands = True          # shared PreparedCommands carry no CmdID of their own
        m.hdr = self._reply_hdr()
        m.commands = [self._hdr_status(1)]
        m.final = False
        return m

    cdef Message _build_all(self, bint final):
        """Challenge / abort acknowledgement / auth end: every owed Status, Final."""
        cdef Message m = self._new_reply()
        cdef Py_ssize_t cid = 2
        cdef Command s
        for o in self._out_status:
            s = <Command?>o
            s.cmd_id = _num(cid)
            cid += 1
            m.commands.append(s)
        self._out_status = []
        m.final = True
        return m

    cdef Message _build(self, bint package):
        """A package message (statuses, then commands, Final when all fit) or, with
        package=False, a 'Next Message' response (statuses + Alert 1222, no Final).

        Sizes: a cheap upper-bound estimate decides while it says "fits"; when it says "does
        not fit" and a real encoder is known, the real size decides (and calibrates the
        estimate for the rest of the message); a last real check trims if needed."""
        cdef Message m = self._new_reply()
        cdef int enc = self._enc
        cdef Py_ssize_t limit = self.peer_max_msg_size
        cdef Py_ssize_t cost, cid = 2, n_status = 0, placed_cmds = 0, nxt_id, first_placed, taken
        cdef Py_ssize_t est_, base
        cdef PreparedCommand prep
        cdef Command s, w, tail = None
        # what this message carries besides Status, in order: the queue's (handle, prepared)
        # pair for a shared command, else (handle, original or None, wire, chunk record)
        cdef list placed = []
        cdef tuple pair
        cdef bint full = False
        cdef bint plain = True            # placed holds shared pairs only, none with NoResp
        cdef double scale
        cdef list cmds = m.commands
        self._scale = 1.0
        if package and not self._out_status and not self._own_cmds and self._out_lo is None \
                and self._qhead >= len(self._queue):
            # the header's Status alone (the last message of a session): nothing to size
            self._stalls = 0
            m.final = True
            return m
        if self._qhead > 32 and self._qhead * 2 > len(self._queue):
            del self._queue[:self._qhead]         # drop what went out
            self._qhead = 0
            self._run_list = None
        est_ = _hdr_size(m.hdr, enc) + _status_size(<Command?>cmds[0], enc) + _empty("Final", enc)
        if not package:
            tail = self._next_alert()
            est_ += _command_size(tail, enc) + 4
        base = est_
        self._est = est_
        # 1. statuses owed to the device (at least one per message, so they always drain)
        while n_status < len(self._out_status):
            s = <Command?>self._out_status[n_status]
            s.cmd_id = _num(cid)
            if n_status > 0 and not self._fit(m, s, limit, tail, _status_size(s, enc)):
                full = True
                break
            if n_status == 0:
                self._est += _status_size(s, enc)
            cid += 1
            cmds.append(s)
            n_status += 1
        if n_status:
            del self._out_status[:n_status]
        first_placed = cid                # what follows is registered from this CmdID on
        # 2. alerts of our own (1225)
        while not full and self._own_cmds:
            w = <Command?>self._own_cmds[0]
            w.cmd_id = _num(cid)
            if not self._fit(m, w, limit, tail):
                full = True
                break
            cid += 1
            cmds.append(w)
            placed.append((_INTERNAL, None, w, None))
            plain = False
            self._own_cmds.pop(0)
        if package and not full:
            # 3. the next chunk of a large object in transit, then queued commands
            if self._out_lo is not None:
                n_status = cid
                cid, full = self._place_chunk(m, cid, limit, base, placed)
                placed_cmds += cid - n_status
                plain = False
            while not full and self._out_lo is None and self._qhead < len(self._queue):
                taken = self._take_run(cmds, placed, limit)
                if taken:
                    cid += taken
                    placed_cmds += taken
                    if self._qhead >= len(self._queue):
                        break
                pair = <tuple>self._queue[self._qhead]
                prep = <PreparedCommand>pair[1]
                self._qhead += 1
                if prep.shared:
                    w = prep.command           # the encoder numbers it (cid)
                    cost = prep.est_xml if enc == ENC_XML else prep.est_wbxml
                    if cost < 0:
                        cost = prep.est(enc)
                    scale = self._scale
                    if limit <= 0 or self._est + <Py_ssize_t>(cost * scale) + 1 <= limit:
                        # fits by the estimate: the common case, without the general path
                        self._est += <Py_ssize_t>(cost * scale) + 1
                        cid += 1
                        cmds.append(w)
                        placed.append(pair)
                        if w.no_resp:
                            plain = False
                        placed_cmds += 1
                        continue
                    nxt_id = cid + 1
                else:
                    w = _wire_copy(prep.command)
                    nxt_id = _number(w, cid)
                    cost = -1
                handle = pair[0]
                if not self._fit(m, w, limit, tail, cost):
                    self._qhead -= 1           # back to the front
                    if cost < 0:
                        cost = _command_size(w, enc)
                    if base + cost > limit and self._too_big_alone(w, limit):
                        self._qhead += 1
                        if self._chunkable(prep.command):
                            if self._start_out_lo(handle, prep.command):
                                n_status = cid
                                cid, full = self._place_chunk(m, cid, limit, base, placed)
                                placed_cmds += cid - n_status
                                plain = False
                            continue
                        self._events.append(new_CommandNotDelivered(
                            handle, f"command of ~{cost} bytes does not fit the device's "
                                    f"MaxMsgSize {limit}"))
                        continue
                    full = True
                    break
                cid = nxt_id
                cmds.append(w)
                if prep.shared:
                    placed.append(pair)
                    if w.no_resp:
                        plain = False
                else:
                    placed.append((handle, prep, w, None))
                    plain = False
                placed_cmds += 1
            if placed_cmds == 0 and (self._qhead < len(self._queue) or self._out_lo is not None) \
                    and not self._out_status:
                self._stalls += 1
                if self._stalls >= 3:            # only Status fits beside the header, again and again
                    self._stalls = 0
                    if self._out_lo is not None:
                        self._events.append(new_CommandNotDelivered(self._out_lo.handle,
                                            "no room for a chunk beside the Status owed"))
                        self._out_lo = None
                    else:
                        handle, orig = self._queue[self._qhead]
                        self._qhead += 1
                        self._events.append(new_CommandNotDelivered(
                            handle, "command does not fit beside the Status owed"))
            else:
                self._stalls = 0
        if not package:
            tail.cmd_id = _num(cid)
            cmds.append(tail)
            placed.append((_INTERNAL, None, tail, None))
            plain = False
        else:
            m.final = not full and not self._out_status and not self._own_cmds and \
                self._out_lo is None and self._qhead >= len(self._queue)
        # 4. a last check with the real encoder when the estimate came near the limit
        if limit > 0 and self._sizer is not None and (
                self._scale < 1.0 or self._est > limit * self.config.verify_ratio):
            self._shrink_to_fit(m, limit, placed, package)
        if placed:
            self._register(placed, first_placed, plain)   # (Status alone: nothing will answer it)
        return m

    cdef Py_ssize_t _take_run(self, list cmds, list placed, Py_ssize_t limit) except -1:
        """Places the run of shared commands (no NoResp) at the head of the queue that fits
        by the estimate, in bulk; returns how many (each takes one CmdID)."""
        cdef list q = self._queue
        cdef Py_ssize_t start = self._qhead, i = start, end = len(q), n, k, c
        cdef Py_ssize_t est = self._est
        cdef double scale = self._scale
        cdef int enc = self._enc
        cdef PyObject* pp
        cdef PyObject* wp
        cdef PyObject** src
        cdef PyObject** dst
        cdef Py_ssize_t size
        if start == 0 and q is self._run_list and end == self._run_len and scale == 1.0 \
                and (limit <= 0 or est + self._run_est <= limit):
            i = end                         # the run queue_many() summed up fits whole
            est += self._run_est
        # borrowed pointers: the queue holds the pairs, the pairs their PreparedCommands
        while i < end:
            pp = _tuple_item(_list_item(q, i), 1)
            if not (<PreparedCommand>pp).bulk:
                break
            c = (<PreparedCommand>pp).est_xml if enc == ENC_XML else (<PreparedCommand>pp).est_wbxml
            if c < 0:
                c = (<PreparedCommand>pp).est(enc)
            if scale != 1.0:
                c = <Py_ssize_t>(c * scale)
            c += 1
            if limit > 0 and est + c > limit:
                break
            est += c
            i += 1
        n = i - start
        if n == 0:
            return 0
        _make_room(cmds, n)
        # each run pair's command, straight into the room made (the queue holds the pairs,
        # each pair its PreparedCommand, each of those its command)
        size = Py_SIZE(<PyObject*>cmds)
        src = (<_ListObj*>q).ob_item + start
        dst = (<_ListObj*>cmds).ob_item + size
        for k in range(n):
            wp = <PyObject*>(<PreparedCommand>_tuple_item(src[k], 1)).command
            _incref(wp)
            dst[k] = wp
        Py_SET_SIZE(<PyObject*>cmds, size + n)
        if start == 0 and i == end and len(placed) == 0:
            _swap_lists(placed, q)          # the whole queue goes: it becomes the placed list
            i = 0
        else:
            placed.extend(q[start:i])
        self._qhead = i
        self._est = est
        return n

    cdef bint _too_big_alone(self, Command w, Py_ssize_t limit) except -1:
        """True when ``w`` would not fit even in a message holding only the header Status."""
        cdef Message probe
        if self._sizer is None:
            return True
        probe = Message.__new__(Message)
        probe.number_commands = True
        probe.hdr = self._probe_hdr()
        probe.commands = [self._hdr_status(1), w]
        probe.final = True
        r = self._measure(probe)
        return r < 0 or r > limit

    cdef SyncHdr _probe_hdr(self):
        """A header like the next one we send (for measuring), without consuming a MsgID."""
        cdef SyncHdr h = self._reply_hdr()
        self._out_msg_id -= 1
        return h

    cdef Py_ssize_t _measure(self, Message m) except -2:
        try:
            return self._sizer(m)
        except DmError:
            return -1

    cdef bint _fit(self, Message m, Command cand, Py_ssize_t limit, Command tail,
                   Py_ssize_t raw_cost=-1) except -1:
        """Does ``cand`` fit after what ``m`` holds?  Updates the running size (self._est).
        ``raw_cost``: its size estimate when known (a PreparedCommand's), else computed."""
        cdef Py_ssize_t cost, r
        cdef list cmds
        cdef bint old_final
        if limit <= 0:
            return True
        if raw_cost < 0:
            raw_cost = _command_size(cand, self._enc)
        cost = <Py_ssize_t>(raw_cost * self._scale) + 1
        if self._est + cost <= limit:
            self._est += cost
            return True
        if self._sizer is None:
            return False
        cmds = m.commands
        old_final = m.final
        m.final = True
        cmds.append(cand)
        if tail is not None:
            cmds.append(tail)
        r = self._measure(m)
        if tail is not None:
            cmds.pop()
        cmds.pop()
        m.final = old_final
        if r < 0:
            return False
        if r <= limit:
            # calibrate: the estimate was too high by this factor (plus 5 % margin)
            if self._est + cost > 0:
                self._scale = min(1.0, max(0.2, self._scale * (r / <double>(self._est + cost)) * 1.05))
            self._est = r
            return True
        return False

    cdef _push_front(self, object handle, object orig):
        self._run_list = None
        if self._qhead > 0:
            self._qhead -= 1
            self._queue[self._qhead] = (handle, orig)
        else:
            self._queue.insert(0, (handle, orig))

    cdef Command _next_alert(self):
        cdef Command a = Command.__new__(Command)
        a.name = "Alert"
        a.data = "1222"
        a.items = [Item(target=self.device_id, source=self.config.server_uri)]
        return a

    cdef _shrink_to_fit(self, Message m, Py_ssize_t limit, list placed, bint package):
        """Removes commands from the end until the real encoding fits (rarely needed: the
        estimate is an upper bound; this guards against a codec that writes more)."""
        cdef Command w
        cdef _OutLO lo
        try:
            size = self._sizer(m)
        except DmError:
            return
        while size > limit and len(m.commands) > 1:
            w = <Command?>m.commands.pop()
            if placed and _placed_wire(<tuple>placed[len(placed) - 1]) is w:
                entry = placed.pop()
                handle, orig, chunk = _entry(entry)
                if handle is _INTERNAL and orig is None:
                    if w.data == "1222":
                        m.commands.append(w)     # the 1222 must stay; drop the one before it
                        placed.append(entry)
                        if len(m.commands) <= 2:
                            break
                        w2 = m.commands.pop(len(m.commands) - 2)
                        self._unplace(w2, placed)
                    else:
                        if self._own_cmds is None:
                            self._own_cmds = []
                        self._own_cmds.insert(0, w)
                elif chunk is not None:
                    lo = <_OutLO>chunk[0]
                    lo.offset = chunk[1]
                    self._out_lo = lo
                else:
                    self._push_front(handle, orig)
            else:
                self._out_status.insert(0, w)
            if package:
                m.final = False
            try:
                size = self._sizer(m)
            except DmError:
                return

    cdef _unplace(self, Command w, list placed):
        cdef Py_ssize_t i
        for i in range(len(placed) - 1, -1, -1):
            if _placed_wire(<tuple>placed[i]) is w:
                handle, orig, chunk = _entry(placed.pop(i))
                if chunk is not None:
                    (<_OutLO>chunk[0]).offset = chunk[1]
                    self._out_lo = <_OutLO>chunk[0]
                elif orig is not None:
                    self._push_front(handle, orig)
                else:
                    if self._own_cmds is None:
                        self._own_cmds = []
                    self._own_cmds.insert(0, w)
                return
        self._out_status.insert(0, w)

    cdef _register(self, list placed, Py_ssize_t first_id, bint plain):
        """Records what this message carries by CmdID, the way the encoder numbers it: a
        command without CmdID gets the one after the previous command's.  ``plain``: only
        shared pairs without NoResp, one CmdID each — ``placed`` itself is the record."""
        cdef Command w
        cdef tuple entry
        cdef _SentMsg sm = _SentMsg.__new__(_SentMsg)
        cdef list entries
        cdef Py_ssize_t i, n, prev = first_id - 1
        cdef bint quiet = False          # some entry has NoResp (or a gap): fix awaiting after
        if plain:
            entries = placed
            self._pkg_cmds += len(placed)
        else:
            entries = []
            for i in range(len(placed)):
                entry = <tuple>placed[i]
                w = _placed_wire(entry)
                handle = entry[0]
                if handle is not _INTERNAL or w.data != "1222":
                    self._pkg_cmds += 1
                if w.cmd_id is None and len(entry) == 2:
                    entries.append(entry)             # a shared PreparedCommand
                    prev += 1
                    if w.no_resp:
                        quiet = True
                else:
                    prev = self._register_tree(entries, first_id, w, handle, -1, prev)
                    quiet = True
        sm.first = first_id
        sm.entries = entries
        n = len(entries)
        sm.await_all(n)
        if quiet:
            for i in range(n):
                entry = <tuple>entries[i]
                if entry is None or _entry_wire(entry).no_resp:
                    sm.awaiting[i] = 0
                    sm.n_awaiting -= 1
        self._sent[_num(self._out_msg_id)] = sm
        self._last_sm = None

    cdef Py_ssize_t _register_tree(self, list entries, Py_ssize_t first_id, Command w,
                                   object handle, int index, Py_ssize_t prev) except -2:
        cdef long k = _parse_uint(w.cmd_id) if w.cmd_id is not None else prev + 1
        cdef Py_ssize_t i
        if k < first_id:
            return prev
        while len(entries) < k - first_id:
            entries.append(None)                  # an id that is not ours
        if len(entries) == k - first_id:
            entries.append((handle, w, index))
        else:
            entries[k - first_id] = (handle, w, index)
        prev = k
        if w.commands is not None:
            i = 0
            for sub in w.commands:
                prev = self._register_tree(entries, first_id, <Command?>sub, handle, i, prev)
                i += 1
        return prev

    cdef bint _awaiting_any(self):
        for o in self._sent.values():
            if (<_SentMsg>o).n_awaiting:
                return True
        return False

    cdef list _awaited_handles(self):
        """Caller handles whose Status has not come yet (each once, in sending order)."""
        cdef _SentMsg sm
        cdef Py_ssize_t k
        cdef list out = []
        for o in self._sent.values():
            sm = <_SentMsg>o
            if sm.n_awaiting == 0:
                continue
            for k in range(len(sm.entries)):
                if sm.awaiting[k]:
                    h = (<tuple>sm.entries[k])[0]
                    if h is not _INTERNAL and h not in out:
                        out.append(h)
        return out

    cdef _drop_open(self, object handle):
        cdef _SentMsg sm
        cdef Py_ssize_t k
        for o in self._sent.values():
            sm = <_SentMsg>o
            for k in range(len(sm.entries)):
                if sm.awaiting[k] and (<tuple>sm.entries[k])[0] is handle:
                    sm.awaiting[k] = 0
                    sm.n_awaiting -= 1

    # -- large objects to the device ----------------------------------------------------------

    cdef bint _chunkable(self, Command c):
        if c.name != "Replace" and c.name != "Add":
            return False
        if c.items is None or len(c.items) != 1:
            return False
        d = (<Item?>c.items[0]).data
        return type(d) is str or isinstance(d, bytes)

    cdef bint _start_out_lo(self, object handle, Command c):
        cdef Item it = <Item?>c.items[0]
        cdef _OutLO lo = _OutLO.__new__(_OutLO)
        cdef long total
        data = it.data
        fmt = _fmt_of(it, c)
        lo.handle = handle
        lo.cmd = c
        lo.data = data
        lo.offset = 0
        lo.align = 1
        if type(data) is str:
            lo.total_units = len(<str>data)
            if fmt is not None and fmt.strip().lower() == "b64" and PyUnicode_IS_ASCII(data):
                lo.align = 4
                raw_len = len(data.strip())
                pad = len(data) - len(data.rstrip("="))
                total = (raw_len // 4) * 3 - pad
            else:
                total = len((<str>data).encode("utf-8"))
            if PyUnicode_IS_ASCII(data):
                lo.unit_cost = 6 if (self._enc == ENC_XML and (('&' in data) or ('<' in data) or ('>' in data))) else 1
            else:
                lo.unit_cost = 24 if self._enc == ENC_XML else 4
        else:
            data = bytes(data)
            lo.data = data
            lo.total_units = len(data)
            total = len(data)
            if self._enc == ENC_XML:
                lo.unit_cost = 2            # base64 is 4/3; 2 keeps a margin
                lo.align = 3
            else:
                lo.unit_cost = 1
        lo.size_text = str(total)
        if self.peer_max_obj_size > 0 and total > self.peer_max_obj_size:
            self._events.append(new_CommandNotDelivered(
                handle, f"object of {total} bytes is larger than the device's MaxObjSize "
                        f"{self.peer_max_obj_size}"))
            return False
        self._out_lo = lo
        return True

    cdef tuple _place_chunk(self, Message m, Py_ssize_t cid, Py_ssize_t limit, Py_ssize_t base,
                            list placed):
        """Puts the next chunk of the object in transit into ``m``; returns (cid, full)."""
        cdef _OutLO lo = self._out_lo
        cdef Command w
        cdef Item src = <Item?>lo.cmd.items[0]
        cdef Item it
        cdef Meta meta
        cdef Py_ssize_t overhead, avail, units, start = lo.offset, remaining, r, tries
        cdef bint last
        w = _wire_copy(lo.cmd)
        it = Item.__new__(Item)
        it.target = src.target
        it.target_name = src.target_name
        it.source = src.source
        it.source_name = src.source_name
        if start == 0:
            meta = Meta.__new__(Meta)
            if src.meta is not None:
                meta.format = src.meta.format
                meta.type = src.meta.type
                meta.mark = src.meta.mark
            meta.size = lo.size_text
            it.meta = meta
        else:
            it.meta = src.meta
        it.more_data = True
        it.data = ""
        w.items = [it]
        w.cmd_id = _num(cid)
        overhead = _command_size(w, self._enc) + 16
        remaining = lo.total_units - start
        if limit > 0 and self._sizer is not None:
            r = self._measure(m)                 # the real size so far beats the estimate
            if r >= 0:
                self._est = r + _empty("Final", self._enc)
        if limit > 0:
            avail = (limit - self._est - overhead) // lo.unit_cost
        else:
            avail = remaining
        avail -= avail % lo.align
        if avail >= remaining:
            units = remaining
        else:
            if avail < self.config.min_chunk and self._est > base:
                return cid, True                 # start it in the next message
            units = avail if avail >= lo.align else lo.align   # progress even on absurd limits
        m.commands.append(w)
        tries = 0
        while True:
            last = units >= remaining
            it.data = lo.data[start:start + units]
            it.more_data = not last
            if limit <= 0 or self._sizer is None:
                break
            m.final = last and self._qhead >= len(self._queue)
            r = self._measure(m)
            m.final = False
            if r < 0 or r <= limit or units <= lo.align or tries >= 6:
                break
            # too big for real: shrink by the overflow (plus a margin) and try again
            units -= ((r - limit) // max(1, lo.unit_cost // 2 if lo.unit_cost > 1 else 1)) + 8 * lo.align
            units -= units % lo.align
            if units < lo.align:
                units = lo.align
            tries += 1
        lo.offset = start + units
        self._est += _command_size(w, self._enc)
        placed.append((lo.handle, lo.cmd, w, (lo, start, last)))
        if last:
            self._out_lo = None
        return cid + 1, not last

    # -- ending ------------------------------------------------------------------------------

    cdef _finish(self, str reason, str detail, list ev):
        """End bookkeeping: CommandNotDelivered for everything pending, then SessionEnded."""
        cdef set seen
        if self.end_reason is not None:
            return
        self.end_reason = reason
        if self._qhead >= len(self._queue) and self._out_lo is None and not self._awaiting_any():
            self._queue = []                 # every command went out and was answered
            self._qhead = 0
            ev.append(new_SessionEnded(reason, detail))
            return
        seen = set()
        for handle, _c in self._queue[self._qhead:]:
            if handle not in seen:
                seen.add(handle)
                ev.append(new_CommandNotDelivered(handle, "not sent before the session ended"))
        self._queue = []
        self._qhead = 0
        if self._out_lo is not None and self._out_lo.handle not in seen:
            seen.add(self._out_lo.handle)
            ev.append(new_CommandNotDelivered(self._out_lo.handle,
                                          "large object not completely sent before the session ended"))
        self._out_lo = None
        for handle in self._awaited_handles():
            if handle not in seen:
                seen.add(handle)
                ev.append(new_CommandNotDelivered(handle, "no Status before the session ended"))
        for o in self._sent.values():
            if (<_SentMsg>o).n_awaiting:
                memset((<_SentMsg>o).awaiting, 0, len((<_SentMsg>o).entries))
                (<_SentMsg>o).n_awaiting = 0
        ev.append(new_SessionEnded(reason, detail))

    def abort(self, str reason="aborted by server"):
        """Alert 1223 + Final (with the Status still owed for the last client message)."""
        cdef int nxt = -1
        cdef Message m
        cdef Command a
        cdef Py_ssize_t cid
        cdef bint owe
        self._lookup(I_SERVER_ABORT, &nxt)
        owe = self._state in (S_OWE_PACKAGE, S_OWE_CONTINUATION, S_OWE_NEXT, S_OWE_CHALLENGE,
                              S_OWE_ABORT_ACK, S_OWE_AUTH_END)
        m = Message.__new__(Message)
        m.hdr = self._reply_hdr()
        m.commands = []
        if owe and self._in_hdr is not None:
            m.commands.append(self._hdr_status(1))
            for o in self._out_status:
                m.commands.append(o)
        self._out_status = []
        cid = 1
        for o in m.commands:
            (<Command?>o).cmd_id = _num(cid)
            cid += 1
        a = Command.__new__(Command)
        a.name = "Alert"
        a.cmd_id = _num(cid)
        a.data = "1223"
        m.commands.append(a)
        m.final = True
        self._finish("aborted_by_server", reason, self._events)
        self._state = nxt
        self._last_reply = m
        self._last_bytes = None
        self._last_reply_to = self._in_msg_id
        self._in_hdr = None
        self.messages_sent += 1
        return m

    def close(self, str reason="closed", str detail=""):
        """Ends the session without a message (idle timeout, shutdown); returns the events."""
        cdef int nxt = -1
        cdef list ev = self._events
        self._events = []
        if self._state == S_ENDED:
            return ev
        self._lookup(I_CLOSE, &nxt)
        self._finish(reason, detail, ev)
        self._state = nxt
        return ev

    def error_reply(self, exc):
        """The answer to a message receive() refused with ProtocolError ``exc``: Status with
        ``exc.status`` for its SyncHdr, Alert 1223, Final."""
        cdef SyncHdr h = self._err_hdr
        cdef Message m = Message.__new__(Message)
        cdef SyncHdr rh = SyncHdr.__new__(SyncHdr)
        cdef Command a
        status = getattr(exc, "status", 400)
        self._out_msg_id += 1
        rh.ver_dtd = "1.2"
        rh.ver_proto = "DM/1.2"
        rh.msg_id = _num(self._out_msg_id)
        rh.source = self.config.server_uri
        rh.resp_uri = self.resp_uri
        if h is not None:
            rh.session_id = h.session_id if h.session_id is not None else (self.session_id or "0")
            rh.target = h.source if h.source is not None else self.device_id
        else:
            rh.session_id = self.session_id or "0"
            rh.target = self.device_id
        m.hdr = rh
        m.commands = []
        if h is not None:
            m.commands.append(_status(1, h.msg_id if h.msg_id is not None else "0", "0", "SyncHdr",
                                      [h.target] if h.target is not None else None,
                                      [h.source] if h.source is not None else None,
                                      str(int(status))))
        a = Command.__new__(Command)
        a.name = "Alert"
        a.cmd_id = _num(len(m.commands) + 1)
        a.data = "1223"
        m.commands.append(a)
        m.final = True
        return m

    def __repr__(self):
        return (f"<DmSession {self.session_key} device={self.device_id!r} "
                f"state={SessionState(self._state).name} in={self._in_msg_id} out={self._out_msg_id}>")
