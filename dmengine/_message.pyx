# cython: language_level=3
"""The SyncML DM message model (see _message.pxd for the conventions)."""
cimport cython

cdef _field_repr(str cls, tuple names, tuple values):
    parts = []
    for n, v in zip(names, values):
        if v is not None and v is not False:
            parts.append(f"{n}={v!r}")
    return f"{cls}({', '.join(parts)})"

@cython.freelist(256)
cdef class Element:
    """A node of a nested document (TNDS, DevInf) carried in Data."""

    _fields = ('tag', 'xmlns', 'text', 'children')

    def __init__(self, *, str tag=None, str xmlns=None, str text=None, list children=None):
        self.tag = tag
        self.xmlns = xmlns
        self.text = text
        self.children = children

    cpdef tuple astuple(self):
        return (self.tag, self.xmlns, self.text, self.children,)

    def __richcmp__(self, other, int op):
        if op != 2 and op != 3:
            return NotImplemented
        if type(other) is not Element:
            return NotImplemented if op == 2 else True
        eq = self.astuple() == (<Element>other).astuple()
        return eq if op == 2 else not eq

    __hash__ = None

    def __repr__(self):
        return _field_repr('Element', self._fields, self.astuple())

    def __reduce__(self):
        return (_rebuild, (Element, self._fields, self.astuple()))

@cython.freelist(256)
cdef class Meta:
    """MetInf values of a Meta, Chal or Cred element."""

    _fields = ('format', 'type', 'mark', 'size', 'max_msg_size', 'max_obj_size', 'next_nonce', 'version', 'extra')

    def __init__(self, *, str format=None, str type=None, str mark=None, str size=None, str max_msg_size=None, str max_obj_size=None, str next_nonce=None, str version=None, list extra=None):
        self.format = format
        self.type = type
        self.mark = mark
        self.size = size
        self.max_msg_size = max_msg_size
        self.max_obj_size = max_obj_size
        self.next_nonce = next_nonce
        self.version = version
        self.extra = extra

    cpdef tuple astuple(self):
        return (self.format, self.type, self.mark, self.size, self.max_msg_size, self.max_obj_size, self.next_nonce, self.version, self.extra,)

    def __richcmp__(self, other, int op):
        if op != 2 and op != 3:
            return NotImplemented
        if type(other) is not Meta:
            return NotImplemented if op == 2 else True
        eq = self.astuple() == (<Meta>other).astuple()
        return eq if op == 2 else not eq

    __hash__ = None

    def __repr__(self):
        return _field_repr('Meta', self._fields, self.astuple())

    def __reduce__(self):
        return (_rebuild, (Meta, self._fields, self.astuple()))

cdef class Cred:
    """Credentials (SyncHdr only in DM)."""

    _fields = ('meta', 'data')

    def __init__(self, *, Meta meta=None, data=None):
        self.meta = meta
        self.data = data

    cpdef tuple astuple(self):
        return (self.meta, self.data,)

    def __richcmp__(self, other, int op):
        if op != 2 and op != 3:
            return NotImplemented
        if type(other) is not Cred:
            return NotImplemented if op == 2 else True
        eq = self.astuple() == (<Cred>other).astuple()
        return eq if op == 2 else not eq

    __hash__ = None

    def __repr__(self):
        return _field_repr('Cred', self._fields, self.astuple())

    def __reduce__(self):
        return (_rebuild, (Cred, self._fields, self.astuple()))

cdef class Chal:
    """A challenge inside a Status."""

    _fields = ('meta',)

    def __init__(self, *, Meta meta=None):
        self.meta = meta

    cpdef tuple astuple(self):
        return (self.meta,)

    def __richcmp__(self, other, int op):
        if op != 2 and op != 3:
            return NotImplemented
        if type(other) is not Chal:
            return NotImplemented if op == 2 else True
        eq = self.astuple() == (<Chal>other).astuple()
        return eq if op == 2 else not eq

    __hash__ = None

    def __repr__(self):
        return _field_repr('Chal', self._fields, self.astuple())

    def __reduce__(self):
        return (_rebuild, (Chal, self._fields, self.astuple()))

@cython.freelist(256)
cdef class Item:
    """One Item of a command: Target/Source URIs, Meta, Data, MoreData."""

    _fields = ('target', 'target_name', 'source', 'source_name', 'target_parent', 'source_parent', 'meta', 'data', 'more_data')

    def __init__(self, *, str target=None, str target_name=None, str source=None, str source_name=None, str target_parent=None, str source_parent=None, Meta meta=None, data=None, bint more_data=False):
        self.target = target
        self.target_name = target_name
        self.source = source
        self.source_name = source_name
        self.target_parent = target_parent
        self.source_parent = source_parent
        self.meta = meta
        self.data = data
        self.more_data = more_data

    cpdef tuple astuple(self):
        return (self.target, self.target_name, self.source, self.source_name, self.target_parent, self.source_parent, self.meta, self.data, self.more_data,)

    def __richcmp__(self, other, int op):
        if op != 2 and op != 3:
            return NotImplemented
        if type(other) is not Item:
            return NotImplemented if op == 2 else True
        eq = self.astuple() == (<Item>other).astuple()
        return eq if op == 2 else not eq

    __hash__ = None

    def __repr__(self):
        return _field_repr('Item', self._fields, self.astuple())

    def __reduce__(self):
        return (_rebuild, (Item, self._fields, self.astuple()))

@cython.freelist(256)
cdef class Command:
    """One SyncBody command; ``name`` is its element name."""

    _fields = ('name', 'cmd_id', 'no_resp', 'msg_ref', 'cmd_ref', 'cmd', 'target_refs', 'source_refs', 'cred', 'chal', 'meta', 'data', 'correlator', 'items', 'commands')

    def __init__(self, *, str name=None, str cmd_id=None, bint no_resp=False, str msg_ref=None, str cmd_ref=None, str cmd=None, list target_refs=None, list source_refs=None, Cred cred=None, Chal chal=None, Meta meta=None, data=None, str correlator=None, list items=None, list commands=None):
        self.name = name
        self.cmd_id = cmd_id
        self.no_resp = no_resp
        self.msg_ref = msg_ref
        self.cmd_ref = cmd_ref
        self.cmd = cmd
        self.target_refs = target_refs
        self.source_refs = source_refs
        self.cred = cred
        self.chal = chal
        self.meta = meta
        self.data = data
        self.correlator = correlator
        self.items = items
        self.commands = commands

    cpdef tuple astuple(self):
        return (self.name, self.cmd_id, self.no_resp, self.msg_ref, self.cmd_ref, self.cmd, self.target_refs, self.source_refs, self.cred, self.chal, self.meta, self.data, self.correlator, self.items, self.commands,)

    def __richcmp__(self, other, int op):
        if op != 2 and op != 3:
            return NotImplemented
        if type(other) is not Command:
            return NotImplemented if op == 2 else True
        eq = self.astuple() == (<Command>other).astuple()
        return eq if op == 2 else not eq

    __hash__ = None

    def __repr__(self):
        return _field_repr('Command', self._fields, self.astuple())

    def __reduce__(self):
        return (_rebuild, (Command, self._fields, self.astuple()))

cdef class SyncHdr:
    """The SyncML header."""

    _fields = ('ver_dtd', 'ver_proto', 'session_id', 'msg_id', 'target', 'target_name', 'source', 'source_name', 'resp_uri', 'no_resp', 'cred', 'meta')

    def __init__(self, *, str ver_dtd=None, str ver_proto=None, str session_id=None, str msg_id=None, str target=None, str target_name=None, str source=None, str source_name=None, str resp_uri=None, bint no_resp=False, Cred cred=None, Meta meta=None):
        self.ver_dtd = ver_dtd
        self.ver_proto = ver_proto
        self.session_id = session_id
        self.msg_id = msg_id
        self.target = target
        self.target_name = target_name
        self.source = source
        self.source_name = source_name
        self.resp_uri = resp_uri
        self.no_resp = no_resp
        self.cred = cred
        self.meta = meta

    cpdef tuple astuple(self):
        return (self.ver_dtd, self.ver_proto, self.session_id, self.msg_id, self.target, self.target_name, self.source, self.source_name, self.resp_uri, self.no_resp, self.cred, self.meta,)

    def __richcmp__(self, other, int op):
        if op != 2 and op != 3:
            return NotImplemented
        if type(other) is not SyncHdr:
            return NotImplemented if op == 2 else True
        eq = self.astuple() == (<SyncHdr>other).astuple()
        return eq if op == 2 else not eq

    __hash__ = None

    def __repr__(self):
        return _field_repr('SyncHdr', self._fields, self.astuple())

    def __reduce__(self):
        return (_rebuild, (SyncHdr, self._fields, self.astuple()))

cdef class Message:
    """One SyncML DM message."""

    _fields = ('hdr', 'commands', 'final')

    def __init__(self, *, SyncHdr hdr=None, list commands=None, bint final=False):
        self.hdr = hdr if hdr is not None else SyncHdr()
        self.commands = commands if commands is not None else []
        self.final = final

    cpdef tuple astuple(self):
        return (self.hdr, self.commands, self.final,)

    def __richcmp__(self, other, int op):
        if op != 2 and op != 3:
            return NotImplemented
        if type(other) is not Message:
            return NotImplemented if op == 2 else True
        eq = self.astuple() == (<Message>other).astuple()
        return eq if op == 2 else not eq

    __hash__ = None

    def __repr__(self):
        return _field_repr('Message', self._fields, self.astuple())

    def __reduce__(self):
        return (_rebuild, (Message, self._fields, self.astuple()))

def _rebuild(cls, names, values):
    return cls(**dict(zip(names, values)))
