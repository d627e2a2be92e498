# cython: language_level=3, freethreading_compatible=False
"""The events a DM session emits (L0: no imports from the rest of the package).

Small immutable records, h11/h2 style.  ``dmengine.events`` is their public home; this module
holds them as extension types because a package 3 answering 50 commands makes ~70 of them:
built from a per-class free list with direct field stores they cost about half of what a
NamedTuple does (allocation, GC link, and the tuple's items).  They keep what callers used of
the NamedTuples: positional and keyword construction with the same defaults, attributes,
equality that also compares the class, hashing, ``repr``, iteration and indexing in field
order, ``_fields`` and ``_asdict()``, pickling.
"""
cimport cython


@cython.freelist(512)
cdef class EventBase:
    """Base of every event: compared by class and fields, immutable, iterable like a tuple.

    The fields live in six slots of the base, so that every event class shares its free list
    (Cython keeps free lists for base types only)."""

    _fields = ()

    cdef tuple _values(self):
        return ()

    def __eq__(self, other):
        if type(self) is not type(other):
            return NotImplemented if not isinstance(other, EventBase) else False
        return self._values() == (<EventBase>other)._values()

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self):
        return hash((type(self).__name__, self._values()))

    def __repr__(self):
        values = self._values()
        inner = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, values))
        return f"{type(self).__name__}({inner})"

    def __iter__(self):
        return iter(self._values())

    def __len__(self):
        return len(self._fields)

    def __getitem__(self, i):
        return self._values()[i]

    def _asdict(self):
        return dict(zip(self._fields, self._values()))

    def __reduce__(self):
        return type(self), self._values()


@cython.final
cdef class DeviceIdentified(EventBase):
    """Package 1 accepted: who the device is and what it said about itself."""

    _fields = ('dev_id', 'devinfo', 'session_id', 'alert',)

    def __init__(self, dev_id, devinfo, session_id, alert):
        self._0 = dev_id
        self._1 = devinfo
        self._2 = session_id
        self._3 = alert

    cdef tuple _values(self):
        return (self._0, self._1, self._2, self._3,)

    @property
    def dev_id(self):
        return self._0

    @property
    def devinfo(self):
        return self._1

    @property
    def session_id(self):
        return self._2

    @property
    def alert(self):
        return self._3


@cython.final
cdef class Authenticated(EventBase):
    """The device authenticated."""

    _fields = ('username', 'scheme',)

    def __init__(self, username, scheme):
        self._0 = username
        self._1 = scheme

    cdef tuple _values(self):
        return (self._0, self._1,)

    @property
    def username(self):
        return self._0

    @property
    def scheme(self):
        return self._1


@cython.final
cdef class AuthFailed(EventBase):
    """Authentication failed: the device's (side "client") or ours as the device saw it ("server")."""

    _fields = ('username', 'scheme', 'status', 'reason', 'side',)

    def __init__(self, username, scheme, status, reason, side="client"):
        self._0 = username
        self._1 = scheme
        self._2 = status
        self._3 = reason
        self._4 = side

    cdef tuple _values(self):
        return (self._0, self._1, self._2, self._3, self._4,)

    @property
    def username(self):
        return self._0

    @property
    def scheme(self):
        return self._1

    @property
    def status(self):
        return self._2

    @property
    def reason(self):
        return self._3

    @property
    def side(self):
        return self._4


@cython.final
cdef class NonceIssued(EventBase):
    """A new nonce the device must use next: persist it as the account's ``client_nonce``."""

    _fields = ('dev_id', 'nonce',)

    def __init__(self, dev_id, nonce):
        self._0 = dev_id
        self._1 = nonce

    cdef tuple _values(self):
        return (self._0, self._1,)

    @property
    def dev_id(self):
        return self._0

    @property
    def nonce(self):
        return self._1


@cython.final
cdef class ServerNonceReceived(EventBase):
    """The device's Chal for us: persist it as the account's ``server_nonce``."""

    _fields = ('dev_id', 'nonce',)

    def __init__(self, dev_id, nonce):
        self._0 = dev_id
        self._1 = nonce

    cdef tuple _values(self):
        return (self._0, self._1,)

    @property
    def dev_id(self):
        return self._0

    @property
    def nonce(self):
        return self._1


@cython.final
cdef class StatusReceived(EventBase):
    """The device's Status for a queued command."""

    _fields = ('handle', 'cmd', 'status', 'items', 'target', 'index',)

    def __init__(self, handle, cmd, status, items=None, target=None, index=-1):
        self._0 = handle
        self._1 = cmd
        self._2 = status
        self._3 = items
        self._4 = target
        self._5 = index

    cdef tuple _values(self):
        return (self._0, self._1, self._2, self._3, self._4, self._5,)

    @property
    def handle(self):
        return self._0

    @property
    def cmd(self):
        return self._1

    @property
    def status(self):
        return self._2

    @property
    def items(self):
        return self._3

    @property
    def target(self):
        return self._4

    @property
    def index(self):
        return self._5


@cython.final
cdef class ResultsReceived(EventBase):
    """The device's Results for a queued Get: (uri, format, type, data) per Item."""

    _fields = ('handle', 'items',)

    def __init__(self, handle, items):
        self._0 = handle
        self._1 = items

    cdef tuple _values(self):
        return (self._0, self._1,)

    @property
    def handle(self):
        return self._0

    @property
    def items(self):
        return self._1


@cython.final
cdef class UserAlertAnswered(EventBase):
    """The device's answer to a UI alert."""

    _fields = ('handle', 'status', 'answers', 'alert',)

    def __init__(self, handle, status, answers, alert=0):
        self._0 = handle
        self._1 = status
        self._2 = answers
        self._3 = alert

    cdef tuple _values(self):
        return (self._0, self._1, self._2, self._3,)

    @property
    def handle(self):
        return self._0

    @property
    def status(self):
        return self._1

    @property
    def answers(self):
        return self._2

    @property
    def alert(self):
        return self._3


@cython.final
cdef class GenericAlert(EventBase):
    """One Item of an Alert 1226."""

    _fields = ('correlator', 'source', 'type', 'format', 'mark', 'data',)

    def __init__(self, correlator, source, type, format, mark, data):
        self._0 = correlator
        self._1 = source
        self._2 = type
        self._3 = format
        self._4 = mark
        self._5 = data

    cdef tuple _values(self):
        return (self._0, self._1, self._2, self._3, self._4, self._5,)

    @property
    def correlator(self):
        return self._0

    @property
    def source(self):
        return self._1

    @property
    def type(self):
        return self._2

    @property
    def format(self):
        return self._3

    @property
    def mark(self):
        return self._4

    @property
    def data(self):
        return self._5


@cython.final
cdef class ClientEvent(EventBase):
    """One Item of an Alert 1224."""

    _fields = ('source', 'type', 'format', 'data',)

    def __init__(self, source, type, format, data):
        self._0 = source
        self._1 = type
        self._2 = format
        self._3 = data

    cdef tuple _values(self):
        return (self._0, self._1, self._2, self._3,)

    @property
    def source(self):
        return self._0

    @property
    def type(self):
        return self._1

    @property
    def format(self):
        return self._2

    @property
    def data(self):
        return self._3


@cython.final
cdef class LargeObjectFailed(EventBase):
    """A large object from the device could not be assembled (413, 424 or 1225)."""

    _fields = ('handle', 'uri', 'status', 'reason',)

    def __init__(self, handle, uri, status, reason):
        self._0 = handle
        self._1 = uri
        self._2 = status
        self._3 = reason

    cdef tuple _values(self):
        return (self._0, self._1, self._2, self._3,)

    @property
    def handle(self):
        return self._0

    @property
    def uri(self):
        return self._1

    @property
    def status(self):
        return self._2

    @property
    def reason(self):
        return self._3


@cython.final
cdef class CommandNotDelivered(EventBase):
    """A queued command was never sent, or never answered, before the session ended."""

    _fields = ('handle', 'reason',)

    def __init__(self, handle, reason):
        self._0 = handle
        self._1 = reason

    cdef tuple _values(self):
        return (self._0, self._1,)

    @property
    def handle(self):
        return self._0

    @property
    def reason(self):
        return self._1


@cython.final
cdef class SessionEnded(EventBase):
    """The session is over; ``reason`` is one of END_REASONS."""

    _fields = ('reason', 'detail',)

    def __init__(self, reason, detail=""):
        self._0 = reason
        self._1 = detail

    cdef tuple _values(self):
        return (self._0, self._1,)

    @property
    def reason(self):
        return self._0

    @property
    def detail(self):
        return self._1
