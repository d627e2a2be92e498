# cython: language_level=3
# (boundscheck, wraparound, initializedcheck and cdivision come from setup.py, so that
#  DMENGINE_DEBUG=1 can turn the checks on; build with `make build`, not bare cythonize)
"""SyncML DM XML codec (L1): bytes <-> the message model of ``dmengine._message``.

The decoder is one pass over the bytes of the message: a scanner that reads start tags, end
tags and text straight from a ``const unsigned char*``, resolves namespaces, dispatches on the
element name and fills the cdef classes of the model directly.  No tree is built in between.

XML rules (documented in ``dmengine/xmlcodec.py``):

* UTF-8 only (optional BOM, optional ``<?xml ...?>`` declaration whose encoding must be UTF-8);
* a DOCTYPE without internal subset is tolerated; an internal subset (entity declarations) is
  refused outright; only the five predefined entities and character references are accepted;
* comments and processing instructions are skipped, CDATA is text;
* whitespace-only text between elements is ignored; leaf text is taken exactly as sent (after
  XML line-end normalisation and entity expansion): no stripping;
* namespaces: the root is ``SyncML`` in ``SYNCML:SYNCML1.2`` (1.1 and 1.0 accepted, compared
  case-insensitively) or in no namespace; MetInf elements in ``syncml:metinf`` (default or
  prefixed) -- or, liberally, in the SyncML namespace / no namespace, since the names do not
  collide;
* unknown SyncBody commands of the SyncML DTD (Sync, Map, Put, Search, Move) decode to a
  ``Command`` with only ``name`` and ``cmd_id``; any other unknown element is an error;
* ``Data`` of an ``Item`` that holds an element (e.g. an inline TNDS ``MgmtTree``) becomes an
  ``Element`` tree;
* every error is a ``CodecError`` with the byte offset.
"""
cimport cython
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_Clear
from libc.string cimport memchr, memcmp, memcpy, strlen
from libc.stdlib cimport malloc, realloc, free

from dmengine._message cimport Message, SyncHdr, Command, Item, Meta, Cred, Chal, Element
from dmengine._decimal cimport next_cmd_id

from dmengine.errors import CodecError

cdef extern from "Python.h":
    PyObject* PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    const char* PyUnicode_AsUTF8AndSize(object u, Py_ssize_t* size)

cdef extern from "strings.h":
    int strncasecmp(const char* a, const char* b, size_t n)

DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_SIZE = 4 * 1024 * 1024
MAX_DEPTH_CAP = 1000                 # decode() recursion is bounded by max_depth; keep it sane
cdef enum:
    ENC_NEST = 100
ENCODE_MAX_NESTING = ENC_NEST        # deepest command / Element nesting encode() follows

NS_SYNCML = "SYNCML:SYNCML1.2"
NS_SYNCML11 = "SYNCML:SYNCML1.1"
NS_METINF = "syncml:metinf"

# ---------------------------------------------------------------------------------------
# character tables

cdef enum:
    C_OK = 0
    C_LT = 1
    C_AMP = 2
    C_CR = 3
    C_BAD = 4
    C_EF = 5
    C_RSQB = 6

cdef enum:
    E_OK = 0
    E_AMP = 1
    E_LT = 2
    E_GT = 3
    E_CR = 4
    E_BAD = 5
    E_EF = 6
    E_QUOT = 7
    E_WS = 8

cdef unsigned char TXT[256]      # text scanner classes
cdef unsigned char NAMEC[256]    # 1 = name char, 3 = name start char
cdef unsigned char ESC[256]      # writer classes

cdef void _init_tables():
    cdef int i
    for i in range(256):
        TXT[i] = C_OK
        NAMEC[i] = 0
        ESC[i] = E_OK
    for i in range(32):
        TXT[i] = C_BAD
        ESC[i] = E_BAD
    TXT[9] = C_OK
    TXT[10] = C_OK
    TXT[13] = C_CR
    TXT[c'<'] = C_LT
    TXT[c'&'] = C_AMP
    TXT[0xEF] = C_EF
    TXT[c']'] = C_RSQB
    ESC[9] = E_WS
    ESC[10] = E_WS
    ESC[13] = E_CR
    ESC[c'&'] = E_AMP
    ESC[c'<'] = E_LT
    ESC[c'>'] = E_GT
    ESC[c'"'] = E_QUOT
    ESC[0xEF] = E_EF
    for i in range(0x80, 0x100):
        NAMEC[i] = 3
    for i in range(ord('a'), ord('z') + 1):
        NAMEC[i] = 3
    for i in range(ord('A'), ord('Z') + 1):
        NAMEC[i] = 3
    for i in range(ord('0'), ord('9') + 1):
        NAMEC[i] = 1
    NAMEC[c'_'] = 3
    NAMEC[c':'] = 3
    NAMEC[c'.'] = 1
    NAMEC[c'-'] = 1

_init_tables()

cdef inline bint is_ws(unsigned char c) noexcept nogil:
    return c == 32 or c == 10 or c == 9 or c == 13

cdef inline int utf8_seq(const unsigned char* p, Py_ssize_t avail) noexcept nogil:
    """Length of the UTF-8 sequence at p (2..4), 0 if invalid, -1 if a non-XML character."""
    cdef unsigned char c = p[0], c1, c2, c3
    if c < 0xC2:
        return 0
    if c < 0xE0:
        if avail < 2 or (p[1] & 0xC0) != 0x80:
            return 0
        return 2
    if c < 0xF0:
        if avail < 3:
            return 0
        c1 = p[1]
        c2 = p[2]
        if (c1 & 0xC0) != 0x80 or (c2 & 0xC0) != 0x80:
            return 0
        if c == 0xE0 and c1 < 0xA0:
            return 0
        if c == 0xED and c1 >= 0xA0:
            return 0
        if c == 0xEF and c1 == 0xBF and (c2 == 0xBE or c2 == 0xBF):
            return -1
        return 3
    if c < 0xF5:
        if avail < 4:
            return 0
        c1 = p[1]
        c2 = p[2]
        c3 = p[3]
        if (c1 & 0xC0) != 0x80 or (c2 & 0xC0) != 0x80 or (c3 & 0xC0) != 0x80:
            return 0
        if c == 0xF0 and c1 < 0x90:
            return 0
        if c == 0xF4 and c1 >= 0x90:
            return 0
        return 4
    return 0

cdef inline bint xml_char(unsigned long cp) noexcept nogil:
    return (cp == 9 or cp == 10 or cp == 13 or (0x20 <= cp <= 0xD7FF)
            or (0xE000 <= cp <= 0xFFFD) or (0x10000 <= cp <= 0x10FFFF))

cdef inline object _steal(PyObject* p):
    o = <object>p
    Py_DECREF(o)
    return o

# ---------------------------------------------------------------------------------------
# element names: page 0 (SyncML) tokens as in WBXML, MetInf tokens = 0x100 | WBXML token

cdef enum:
    S_Add = 0x05
    S_Alert = 0x06
    S_Archive = 0x07
    S_Atomic = 0x08
    S_Chal = 0x09
    S_Cmd = 0x0A
    S_CmdID = 0x0B
    S_CmdRef = 0x0C
    S_Copy = 0x0D
    S_Cred = 0x0E
    S_Data = 0x0F
    S_Delete = 0x10
    S_Exec = 0x11
    S_Final = 0x12
    S_Get = 0x13
    S_Item = 0x14
    S_Lang = 0x15
    S_LocName = 0x16
    S_LocURI = 0x17
    S_Map = 0x18
    S_MapItem = 0x19
    S_Meta = 0x1A
    S_MsgID = 0x1B
    S_MsgRef = 0x1C
    S_NoResp = 0x1D
    S_NoResults = 0x1E
    S_Put = 0x1F
    S_Replace = 0x20
    S_RespURI = 0x21
    S_Results = 0x22
    S_Search = 0x23
    S_Sequence = 0x24
    S_SessionID = 0x25
    S_SftDel = 0x26
    S_Source = 0x27
    S_SourceRef = 0x28
    S_Status = 0x29
    S_Sync = 0x2A
    S_SyncBody = 0x2B
    S_SyncHdr = 0x2C
    S_SyncML = 0x2D
    S_Target = 0x2E
    S_TargetRef = 0x2F
    S_VerDTD = 0x31
    S_VerProto = 0x32
    S_NumberOfChanges = 0x33
    S_MoreData = 0x34
    S_Field = 0x35
    S_Filter = 0x36
    S_Record = 0x37
    S_FilterType = 0x38
    S_SourceParent = 0x39
    S_TargetParent = 0x3A
    S_Move = 0x3B
    S_Correlator = 0x3C
    M_Anchor = 0x105
    M_EMI = 0x106
    M_Format = 0x107
    M_FreeID = 0x108
    M_FreeMem = 0x109
    M_Last = 0x10A
    M_Mark = 0x10B
    M_MaxMsgSize = 0x10C
    M_Mem = 0x10D
    M_MetInf = 0x10E
    M_Next = 0x10F
    M_NextNonce = 0x110
    M_SharedMem = 0x111
    M_Size = 0x112
    M_Type = 0x113
    M_Version = 0x114
    M_MaxObjSize = 0x115
    M_FieldLevel = 0x116
    NTOK = 0x120

_SYNCML_NAMES = {
    0x05: "Add", 0x06: "Alert", 0x07: "Archive", 0x08: "Atomic", 0x09: "Chal", 0x0A: "Cmd",
    0x0B: "CmdID", 0x0C: "CmdRef", 0x0D: "Copy", 0x0E: "Cred", 0x0F: "Data", 0x10: "Delete",
    0x11: "Exec", 0x12: "Final", 0x13: "Get", 0x14: "Item", 0x15: "Lang", 0x16: "LocName",
    0x17: "LocURI", 0x18: "Map", 0x19: "MapItem", 0x1A: "Meta", 0x1B: "MsgID", 0x1C: "MsgRef",
    0x1D: "NoResp", 0x1E: "NoResults", 0x1F: "Put", 0x20: "Replace", 0x21: "RespURI",
    0x22: "Results", 0x23: "Search", 0x24: "Sequence", 0x25: "SessionID", 0x26: "SftDel",
    0x27: "Source", 0x28: "SourceRef", 0x29: "Status", 0x2A: "Sync", 0x2B: "SyncBody",
    0x2C: "SyncHdr", 0x2D: "SyncML", 0x2E: "Target", 0x2F: "TargetRef", 0x31: "VerDTD",
    0x32: "VerProto", 0x33: "NumberOfChanges", 0x34: "MoreData", 0x35: "Field", 0x36: "Filter",
    0x37: "Record", 0x38: "FilterType", 0x39: "SourceParent", 0x3A: "TargetParent",
    0x3B: "Move", 0x3C: "Correlator",
}
_METINF_NAMES = {
    0x05: "Anchor", 0x06: "EMI", 0x07: "Format", 0x08: "FreeID", 0x09: "FreeMem", 0x0A: "Last",
    0x0B: "Mark", 0x0C: "MaxMsgSize", 0x0D: "Mem", 0x0E: "MetInf", 0x0F: "Next",
    0x10: "NextNonce", 0x11: "SharedMem", 0x12: "Size", 0x13: "Type", 0x14: "Version",
    0x15: "MaxObjSize", 0x16: "FieldLevel",
}

#: SyncBody commands the model carries in full.
COMMANDS = frozenset({"Add", "Alert", "Atomic", "Copy", "Delete", "Exec", "Get", "Replace",
                      "Sequence", "Status", "Results"})
#: SyncBody commands of the SyncML DTD that DM does not use: decoded to name + CmdID only.
OTHER_COMMANDS = frozenset({"Sync", "Map", "Put", "Search", "Move"})
#: MetInf elements without a Meta field: they land in Meta.extra as (name, str), or for the
#: groups as (name, [(child, str), ...]).
METINF_EXTRA = frozenset({"EMI", "FreeID", "FreeMem", "Last", "Next", "SharedMem", "FieldLevel"})
METINF_GROUPS = frozenset({"Anchor", "Mem", "MetInf"})

cdef struct NameEnt:
    const char* s
    int n
    int tok

cdef NameEnt NTAB[512]
cdef list NAMES = [None] * NTOK       # token -> interned str
cdef list _KEEP = []                  # keeps the bytes of NTAB alive

cdef inline unsigned int nhash(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    return (<unsigned int>n * 31u + <unsigned int>p[0] * 7u + <unsigned int>p[n - 1] * 13u
            + <unsigned int>p[n >> 1] * 3u) & 511u

cdef inline int lookup(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef unsigned int h
    if n <= 0 or n > 20:
        return -1
    h = nhash(p, n)
    while NTAB[h].s != NULL:
        if NTAB[h].n == n and memcmp(NTAB[h].s, p, n) == 0:
            return NTAB[h].tok
        h = (h + 1) & 511u
    return -1

cdef void _add_name(str name, int tok):
    cdef bytes bn = name.encode()
    cdef unsigned int h = nhash(<const unsigned char*>PyBytes_AS_STRING(bn), len(bn))
    _KEEP.append(bn)
    while NTAB[h].s != NULL:
        h = (h + 1) & 511u
    NTAB[h].s = PyBytes_AS_STRING(bn)
    NTAB[h].n = len(bn)
    NTAB[h].tok = tok
    NAMES[tok] = name

cdef void _init_names():
    cdef int i
    for i in range(512):
        NTAB[i].s = NULL
    for k, v in _SYNCML_NAMES.items():
        _add_name(v, k)
    for k, v in _METINF_NAMES.items():
        _add_name(v, 0x100 | k)

_init_names()

cdef inline bint is_command(int tok) noexcept nogil:
    return (tok == S_Add or tok == S_Alert or tok == S_Atomic or tok == S_Copy or tok == S_Delete
            or tok == S_Exec or tok == S_Get or tok == S_Replace or tok == S_Sequence
            or tok == S_Status or tok == S_Results)

cdef inline bint is_other_command(int tok) noexcept nogil:
    return tok == S_Sync or tok == S_Map or tok == S_Put or tok == S_Search or tok == S_Move

# ---------------------------------------------------------------------------------------
# decoder

cdef enum:
    NSK_NONE = 0
    NSK_SYNCML = 1
    NSK_METINF = 2
    NSK_OTHER = 3
    MAX_SCOPES = 64
    MAX_ATTRS = 16
    MODE_TEXT = 0
    MODE_MIXED = 1
    MODE_SKIP = 2

cdef struct Scope:
    Py_ssize_t pfx        # offset of the prefix, -1 for a default declaration
    Py_ssize_t pfx_len
    int ns
    int uri               # index in _Reader.uris for NSK_OTHER

cdef struct Tag:
    Py_ssize_t start      # offset of '<'
    Py_ssize_t qname
    Py_ssize_t qlen
    Py_ssize_t local
    Py_ssize_t llen
    int ns
    int uri
    int empty             # 0 has content, 1 self-closing, 2 self-closing and consumed
    int nscopes           # scope stack height before this element's declarations


@cython.final
cdef class _Reader:
    cdef bytes src
    cdef const unsigned char* b
    cdef Py_ssize_t pos
    cdef Py_ssize_t end
    cdef int depth
    cdef int max_depth
    cdef int nscopes
    cdef Scope scopes[MAX_SCOPES]
    cdef list uris
    cdef char* sb
    cdef Py_ssize_t sblen
    cdef Py_ssize_t sbcap
    cdef str locname
    cdef list kids

    def __cinit__(self):
        self.sb = NULL
        self.sbcap = 0
        self.sblen = 0

    def __dealloc__(self):
        if self.sb != NULL:
            free(self.sb)

    # -- errors ---------------------------------------------------------------------------

    cdef int fail(self, str msg, Py_ssize_t off, str expected=None) except -1:
        raise CodecError(msg, offset=off, expected=expected)

    cdef int truncated(self, str expected) except -1:
        raise CodecError("truncated document", offset=self.end, expected=expected)

    cdef str qname(self, Tag* t):
        return (<bytes>self.src[t.qname:t.qname + t.qlen]).decode("utf-8", "replace")

    cdef int bad_child(self, Tag* c, Tag* parent) except -1:
        raise CodecError(f"element <{self.qname(c)}> not allowed in <{self.qname(parent)}>",
                         offset=c.start)

    cdef int dup(self, Tag* c) except -1:
        raise CodecError(f"duplicate element <{self.qname(c)}>", offset=c.start)

    # -- scratch buffer -------------------------------------------------------------------

    cdef int sb_grow(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap = self.sbcap * 2
        cdef char* p
        if cap < self.sblen + n:
            cap = self.sblen + n
        if cap < 256:
            cap = 256
        p = <char*>realloc(self.sb, cap)
        if p == NULL:
            raise MemoryError()
        self.sb = p
        self.sbcap = cap
        return 0

    cdef inline int sb_put(self, const unsigned char* p, Py_ssize_t n) except -1:
        if self.sblen + n > self.sbcap:
            self.sb_grow(n)
        memcpy(self.sb + self.sblen, p, n)
        self.sblen += n
        return 0

    cdef int sb_cp(self, unsigned long cp) except -1:
        cdef unsigned char u[4]
        cdef int n
        if cp < 0x80:
            u[0] = <unsigned char>cp
            n = 1
        elif cp < 0x800:
            u[0] = <unsigned char>(0xC0 | (cp >> 6))
            u[1] = <unsigned char>(0x80 | (cp & 0x3F))
            n = 2
        elif cp < 0x10000:
            u[0] = <unsigned char>(0xE0 | (cp >> 12))
            u[1] = <unsigned char>(0x80 | ((cp >> 6) & 0x3F))
            u[2] = <unsigned char>(0x80 | (cp & 0x3F))
            n = 3
        else:
            u[0] = <unsigned char>(0xF0 | (cp >> 18))
            u[1] = <unsigned char>(0x80 | ((cp >> 12) & 0x3F))
            u[2] = <unsigned char>(0x80 | ((cp >> 6) & 0x3F))
            u[3] = <unsigned char>(0x80 | (cp & 0x3F))
            n = 4
        return self.sb_put(u, n)

    cdef str sb_str(self):
        cdef PyObject* r = PyUnicode_DecodeUTF8(self.sb, self.sblen, NULL)
        if r == NULL:      # cannot happen: every run was validated before it was copied
            PyErr_Clear()
            raise CodecError("invalid UTF-8 in text", offset=self.pos)
        return <str>_steal(r)

    # -- characters -----------------------------------------------------------------------

    cdef int check_chars(self, Py_ssize_t s, Py_ssize_t e) except -1:
        """Every byte in [s, e) must be valid UTF-8 of a character XML 1.0 allows."""
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t i = s
        cdef unsigned char c
        cdef int n
        while i < e:
            c = b[i]
            if c < 0x80:
                if c < 0x20 and c != 9 and c != 10 and c != 13:
                    self.fail(f"character U+{c:04X} not allowed in XML", i)
                i += 1
            else:
                n = utf8_seq(b + i, e - i)
                if n == 0:
                    self.fail("invalid UTF-8", i, "UTF-8")
                if n < 0:
                    self.fail("character U+FFFE/U+FFFF not allowed in XML", i)
                i += n
        return 0

    cdef str dec(self, Py_ssize_t s, Py_ssize_t n):
        cdef PyObject* r = PyUnicode_DecodeUTF8(<const char*>self.b + s, n, NULL)
        if r == NULL:
            PyErr_Clear()
            self.check_chars(s, s + n)
            self.fail("invalid UTF-8", s, "UTF-8")
        return <str>_steal(r)

    cdef Py_ssize_t ref(self, Py_ssize_t i, bint keep) except -1:
        """Parses the reference at i ('&'), appends its character to sb when keep; returns
        the offset after ';'."""
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t j = i + 1, s
        cdef unsigned long cp = 0
        cdef unsigned char c
        cdef int nd = 0
        if b[j] == c'#':
            j += 1
            if b[j] == c'x':
                j += 1
                while True:
                    c = b[j]
                    if c'0' <= c <= c'9':
                        cp = cp * 16 + (c - c'0')
                    elif c'a' <= c <= c'f':
                        cp = cp * 16 + (c - c'a' + 10)
                    elif c'A' <= c <= c'F':
                        cp = cp * 16 + (c - c'A' + 10)
                    else:
                        break
                    nd += 1
                    if cp > 0x10FFFF:
                        self.fail("character reference out of range", i)
                    j += 1
            else:
                while c'0' <= b[j] <= c'9':
                    cp = cp * 10 + (b[j] - c'0')
                    nd += 1
                    if cp > 0x10FFFF:
                        self.fail("character reference out of range", i)
                    j += 1
            if j >= self.end:
                self.truncated("';'")
            if nd == 0 or b[j] != c';':
                self.fail("malformed character reference", i, "&#NN; or &#xHH;")
            if not xml_char(cp):
                self.fail(f"character reference to U+{cp:04X}, which XML does not allow", i)
            if keep:
                self.sb_cp(cp)
            return j + 1
        s = j
        while NAMEC[b[j]]:
            j += 1
        if j >= self.end:
            self.truncated("';'")
        if b[j] != c';' or j == s:
            self.fail("malformed entity reference", i, "&name;")
        if j - s == 2 and b[s] == c'l' and b[s + 1] == c't':
            cp = c'<'
        elif j - s == 2 and b[s] == c'g' and b[s + 1] == c't':
            cp = c'>'
        elif j - s == 3 and memcmp(b + s, b"amp", 3) == 0:
            cp = c'&'
        elif j - s == 4 and memcmp(b + s, b"quot", 4) == 0:
            cp = c'"'
        elif j - s == 4 and memcmp(b + s, b"apos", 4) == 0:
            cp = c"'"
        else:
            self.fail(f"undefined entity &{self.dec(s, j - s)}; (only the five predefined "
                      "entities and character references are accepted)", i)
        if keep:
            self.sb_cp(cp)
        return j + 1

    # -- markup that is skipped -----------------------------------------------------------

    cdef Py_ssize_t skip_comment(self, Py_ssize_t i) except -1:
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t j = i + 4, k
        cdef const unsigned char* p
        while True:
            p = <const unsigned char*>memchr(b + j, c'-', self.end - j)
            if p == NULL:
                self.truncated("'-->'")
            k = p - b
            if b[k + 1] == c'-':
                if b[k + 2] == c'>':
                    self.check_chars(i + 4, k)
                    return k + 3
                if k + 2 >= self.end:
                    self.truncated("'-->'")
                self.fail("'--' not allowed inside a comment", k)
            j = k + 1

    cdef Py_ssize_t skip_pi(self, Py_ssize_t i) except -1:
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t j = i + 2, s = i + 2, k
        cdef const unsigned char* p
        if NAMEC[b[j]] != 3:
            if j >= self.end:
                self.truncated("a processing instruction target")
            self.fail("malformed processing instruction", i)
        while NAMEC[b[j]]:
            j += 1
        if j - s == 3 and strncasecmp(<const char*>b + s, "xml", 3) == 0:
            self.fail("XML declaration only allowed at the very start", i)
        while True:
            p = <const unsigned char*>memchr(b + j, c'?', self.end - j)
            if p == NULL:
                self.truncated("'?>'")
            k = p - b
            if b[k + 1] == c'>':
                self.check_chars(i + 2, k)
                return k + 2
            j = k + 1

    cdef Py_ssize_t cdata(self, Py_ssize_t i, bint keep) except -1:
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t s = i + 9, j = i + 9, k, r
        cdef const unsigned char* p
        while True:
            p = <const unsigned char*>memchr(b + j, c']', self.end - j)
            if p == NULL:
                self.truncated("']]>'")
            k = p - b
            if b[k + 1] == c']' and b[k + 2] == c'>':
                break
            j = k + 1
        self.check_chars(s, k)
        if keep:
            if memchr(b + s, c'\r', k - s) == NULL:
                self.sb_put(b + s, k - s)
            else:
                r = s
                while r < k:
                    if b[r] == c'\r':
                        self.sb_put(<const unsigned char*>"\n", 1)
                        if r + 1 < k and b[r + 1] == c'\n':
                            r += 1
                    else:
                        self.sb_put(b + r, 1)
                    r += 1
        return k + 3

    # -- tags -----------------------------------------------------------------------------

    cdef Py_ssize_t quoted(self, Py_ssize_t i) except -1:
        """A quoted literal starts at i; returns the offset of the closing quote."""
        cdef unsigned char q = self.b[i]
        cdef const unsigned char* p
        if q != c'"' and q != c"'":
            if i >= self.end:
                self.truncated("a quoted value")
            self.fail("expected a quoted value", i, "'\"'")
        p = <const unsigned char*>memchr(self.b + i + 1, q, self.end - i - 1)
        if p == NULL:
            self.truncated("a closing quote")
        return p - self.b

    cdef int attr_value(self, Py_ssize_t vs, Py_ssize_t ve) except -1:
        cdef const unsigned char* b = self.b
        cdef const unsigned char* p
        cdef Py_ssize_t j
        p = <const unsigned char*>memchr(b + vs, c'<', ve - vs)
        if p != NULL:
            self.fail("'<' not allowed in an attribute value", p - b)
        self.check_chars(vs, ve)
        j = vs
        while True:
            p = <const unsigned char*>memchr(b + j, c'&', ve - j)
            if p == NULL:
                return 0
            j = self.ref(p - b, False)
            if j > ve:
                self.fail("malformed reference in an attribute value", p - b)

    cdef int push_ns(self, Py_ssize_t pfx, Py_ssize_t pfx_len, Py_ssize_t vs, Py_ssize_t ve) except -1:
        cdef const unsigned char* b = self.b
        cdef Scope* s = NULL
        cdef Py_ssize_t n = ve - vs, j
        cdef const char* v = <const char*>b + vs
        cdef bytes tmp
        cdef str uri
        if self.nscopes == MAX_SCOPES:
            self.fail("too many namespace declarations in scope", vs)
        s = &self.scopes[self.nscopes]
        s.pfx = pfx
        s.pfx_len = pfx_len
        s.uri = -1
        if memchr(v, c'&', n) != NULL or memchr(v, c'\t', n) != NULL or memchr(v, c'\n', n) != NULL \
                or memchr(v, c'\r', n) != NULL:
            # rare: expand references and normalise whitespace, then classify the result
            self.sblen = 0
            j = vs
            while j < ve:
                if b[j] == c'&':
                    j = self.ref(j, True)
                elif is_ws(b[j]):
                    self.sb_put(<const unsigned char*>" ", 1)
                    j += 1
                else:
                    self.sb_put(b + j, 1)
                    j += 1
            uri = self.sb_str()
            tmp = uri.encode("utf-8")
            v = PyBytes_AS_STRING(tmp)
            n = len(tmp)
        else:
            uri = None
        if n == 0:
            if pfx >= 0:
                self.fail("a namespace prefix cannot be bound to the empty name", vs)
            s.ns = NSK_NONE
        elif n == 16 and (strncasecmp(v, "SYNCML:SYNCML1.2", 16) == 0
                          or strncasecmp(v, "SYNCML:SYNCML1.1", 16) == 0
                          or strncasecmp(v, "SYNCML:SYNCML1.0", 16) == 0):
            s.ns = NSK_SYNCML
        elif n == 13 and strncasecmp(v, "syncml:metinf", 13) == 0:
            s.ns = NSK_METINF
        else:
            s.ns = NSK_OTHER
            s.uri = len(self.uris)
            self.uris.append(uri if uri is not None else self.dec(vs, n))
        self.nscopes += 1
        return 0

    cdef int start_tag(self, Tag* t) except -1:
        """Reads the start tag at self.pos ('<' followed by a name start character)."""
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t i = self.pos + 1, colon = -1, an, alen, vs, ve, k, plen
        cdef Py_ssize_t anames[MAX_ATTRS]
        cdef Py_ssize_t alens[MAX_ATTRS]
        cdef int na = 0
        cdef unsigned char c
        cdef Scope* s = NULL
        t.start = self.pos
        t.nscopes = self.nscopes
        t.qname = i
        if NAMEC[b[i]] != 3:
            if i >= self.end:
                self.truncated("an element name")
            self.fail("expected an element name", i)
        while NAMEC[b[i]]:
            if b[i] == c':':
                if colon >= 0:
                    self.fail("malformed qualified name", i)
                colon = i
            i += 1
        t.qlen = i - t.qname
        if colon >= 0:
            t.local = colon + 1
            t.llen = t.qname + t.qlen - colon - 1
            if t.llen == 0 or colon == t.qname or NAMEC[b[colon + 1]] != 3:
                self.fail("malformed qualified name", t.qname)
        else:
            t.local = t.qname
            t.llen = t.qlen
        while True:
            c = b[i]
            if c == c'>':
                i += 1
                t.empty = 0
                break
            if c == c'/':
                if b[i + 1] != c'>':
                    if i + 1 >= self.end:
                        self.truncated("'>'")
                    self.fail("expected '>' after '/'", i + 1, "'>'")
                i += 2
                t.empty = 1
                break
            if not is_ws(c):
                if i >= self.end:
                    self.truncated("'>'")
                self.fail("expected whitespace, '>' or '/>' in a start tag", i)
            while is_ws(b[i]):
                i += 1
            c = b[i]
            if c == c'>' or c == c'/':
                continue
            if NAMEC[c] != 3:
                if i >= self.end:
                    self.truncated("'>'")
                self.fail("expected an attribute name", i)
            an = i
            while NAMEC[b[i]]:
                i += 1
            alen = i - an
            while is_ws(b[i]):
                i += 1
            if b[i] != c'=':
                if i >= self.end:
                    self.truncated("'='")
                self.fail("expected '=' after an attribute name", i, "'='")
            i += 1
            while is_ws(b[i]):
                i += 1
            ve = self.quoted(i)
            vs = i + 1
            i = ve + 1
            for k in range(na):
                if alens[k] == alen and memcmp(b + anames[k], b + an, alen) == 0:
                    self.fail("duplicate attribute", an)
            if na == MAX_ATTRS:
                self.fail("too many attributes", an)
            anames[na] = an
            alens[na] = alen
            na += 1
            self.attr_value(vs, ve)
            if alen == 5 and memcmp(b + an, b"xmlns", 5) == 0:
                self.push_ns(-1, 0, vs, ve)
            elif alen > 6 and memcmp(b + an, b"xmlns:", 6) == 0:
                self.push_ns(an + 6, alen - 6, vs, ve)
            c = b[i]
            if not (is_ws(c) or c == c'>' or c == c'/'):
                if i >= self.end:
                    self.truncated("'>'")
                self.fail("expected whitespace, '>' or '/>' after an attribute", i)
        self.pos = i
        # namespace of the element
        t.uri = -1
        if colon >= 0:
            plen = colon - t.qname
            k = self.nscopes - 1
            while k >= 0:
                s = &self.scopes[k]
                if s.pfx >= 0 and s.pfx_len == plen and memcmp(b + s.pfx, b + t.qname, plen) == 0:
                    break
                k -= 1
            if k < 0:
                self.fail(f"undeclared namespace prefix '{self.dec(t.qname, plen)}'", t.qname)
            t.ns = s.ns
            t.uri = s.uri
        else:
            k = self.nscopes - 1
            t.ns = NSK_NONE
            while k >= 0:
                s = &self.scopes[k]
                if s.pfx < 0:
                    t.ns = s.ns
                    t.uri = s.uri
                    break
                k -= 1
        self.depth += 1
        if self.depth > self.max_depth:
            self.fail(f"elements nested deeper than max_depth={self.max_depth}", t.start)
        return 0

    cdef int end_tag(self, Tag* t) except -1:
        """Reads the end tag at self.pos ('</') that must close t."""
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t i = self.pos + 2
        if (i + t.qlen > self.end or memcmp(b + i, b + t.qname, t.qlen) != 0
                or NAMEC[b[i + t.qlen]] != 0):
            if i + t.qlen > self.end:
                self.truncated(f"</{self.qname(t)}>")
            self.fail(f"mismatched end tag (<{self.qname(t)}> opened at offset {t.start})",
                      self.pos, f"</{self.qname(t)}>")
        i += t.qlen
        while is_ws(b[i]):
            i += 1
        if b[i] != c'>':
            if i >= self.end:
                self.truncated("'>'")
            self.fail("expected '>' in an end tag", i, "'>'")
        self.pos = i + 1
        self.nscopes = t.nscopes
        self.depth -= 1
        return 0

    cdef inline void close_empty(self, Tag* t) noexcept:
        t.empty = 2
        self.nscopes = t.nscopes
        self.depth -= 1

    cdef int next_child(self, Tag* parent, Tag* child) except -1:
        """In element-only content: reads the next child start tag into child (returns 1) or
        the end tag of parent (returns 0).  Whitespace, comments and PIs are skipped."""
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t i
        cdef unsigned char c1
        if parent.empty:
            if parent.empty == 1:
                self.close_empty(parent)
            return 0
        i = self.pos
        while True:
            while is_ws(b[i]):
                i += 1
            if b[i] != c'<':
                if i >= self.end:
                    self.truncated(f"</{self.qname(parent)}>")
                self.fail(f"text not allowed in <{self.qname(parent)}>", i,
                          f"an element or </{self.qname(parent)}>")
            c1 = b[i + 1]
            if c1 == c'/':
                self.pos = i
                self.end_tag(parent)
                return 0
            if c1 == c'!':
                if i + 4 <= self.end and memcmp(b + i, b"<!--", 4) == 0:
                    i = self.skip_comment(i)
                    continue
                if i + 9 <= self.end and memcmp(b + i, b"<![CDATA[", 9) == 0:
                    self.fail(f"CDATA not allowed in <{self.qname(parent)}>", i)
                if i + 9 > self.end:
                    self.truncated("an element")
                self.fail("unexpected markup '<!'", i)
            if c1 == c'?':
                i = self.skip_pi(i)
                continue
            self.pos = i
            self.start_tag(child)
            return 1

    # -- content --------------------------------------------------------------------------

    cdef object text_fast(self, Tag* t):
        """Leaf text without references, CR or markup, followed by the exact end tag; else
        None (the caller takes the slow path)."""
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t i = self.pos, s = self.pos, e
        cdef unsigned char k
        cdef str r
        while True:
            k = TXT[b[i]]
            if k == C_OK:
                i += 1
                continue
            if k == C_RSQB:
                if b[i + 1] == c']' and b[i + 2] == c'>':
                    self.fail("']]>' not allowed in text", i)
                i += 1
                continue
            if k == C_EF:
                if b[i + 1] == 0xBF and (b[i + 2] == 0xBE or b[i + 2] == 0xBF):
                    self.fail("character U+FFFE/U+FFFF not allowed in XML", i)
                i += 1
                continue
            break
        if k != C_LT or b[i + 1] != c'/':
            return None
        e = i + 2 + t.qlen
        if e >= self.end or b[e] != c'>' or memcmp(b + i + 2, b + t.qname, t.qlen) != 0:
            return None
        r = self.dec(s, i - s)
        self.pos = e + 1
        self.nscopes = t.nscopes
        self.depth -= 1
        return r

    cdef str content(self, Tag* t, Py_ssize_t i, int mode, object ns):
        """Content of t from offset i up to and including its end tag.  MODE_TEXT: text only;
        MODE_MIXED: child elements become Elements (left in self.kids); MODE_SKIP: children
        are checked and dropped.  Returns the text (all text pieces concatenated)."""
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t s
        cdef unsigned char k, c1
        cdef list pieces = None
        cdef list kids = None
        cdef Tag ct
        cdef str r
        self.sblen = 0
        while True:
            s = i
            while True:
                k = TXT[b[i]]
                if k == C_OK or k == C_EF:
                    i += 1
                    continue
                if k == C_RSQB:
                    if b[i + 1] == c']' and b[i + 2] == c'>':
                        self.fail("']]>' not allowed in text", i)
                    i += 1
                    continue
                break
            if i > s:
                self.check_chars(s, i)
                if mode != MODE_SKIP:
                    self.sb_put(b + s, i - s)
            if i >= self.end:
                self.truncated(f"</{self.qname(t)}>")
            if k == C_BAD:
                self.fail(f"character U+{b[i]:04X} not allowed in XML", i)
            if k == C_CR:
                if mode != MODE_SKIP:
                    self.sb_put(<const unsigned char*>"\n", 1)
                i += 1
                if b[i] == c'\n':
                    i += 1
                continue
            if k == C_AMP:
                i = self.ref(i, mode != MODE_SKIP)
                continue
            # '<'
            c1 = b[i + 1]
            if c1 == c'/':
                self.pos = i
                self.end_tag(t)
                break
            if c1 == c'!':
                if i + 4 <= self.end and memcmp(b + i, b"<!--", 4) == 0:
                    i = self.skip_comment(i)
                    continue
                if i + 9 <= self.end and memcmp(b + i, b"<![CDATA[", 9) == 0:
                    i = self.cdata(i, mode != MODE_SKIP)
                    continue
                if i + 9 > self.end:
                    self.truncated(f"</{self.qname(t)}>")
                self.fail("unexpected markup '<!'", i)
            if c1 == c'?':
                i = self.skip_pi(i)
                continue
            if mode == MODE_TEXT:
                self.pos = i
                self.start_tag(&ct)
                self.fail(f"element <{self.qname(&ct)}> not allowed in <{self.qname(t)}> "
                          "(text expected)", ct.start)
            if mode == MODE_SKIP:
                self.pos = i
                self.start_tag(&ct)
                if ct.empty:
                    self.close_empty(&ct)
                else:
                    self.content(&ct, self.pos, MODE_SKIP, None)
                i = self.pos
                continue
            # MODE_MIXED
            if pieces is None:
                pieces = []
                kids = []
            if self.sblen:
                pieces.append(self.sb_str())
            self.pos = i
            self.start_tag(&ct)
            kids.append(self.element(&ct, ns))
            i = self.pos
            self.sblen = 0
        if mode == MODE_SKIP:
            return None
        if pieces is None:
            return self.sb_str()
        if self.sblen:
            pieces.append(self.sb_str())
        self.kids = kids
        return "".join(pieces)

    cdef str text(self, Tag* t):
        """The text of a leaf element ("" when empty)."""
        if t.empty:
            self.close_empty(t)
            return ""
        r = self.text_fast(t)
        if r is None:
            r = self.content(t, self.pos, MODE_TEXT, None)
        return <str>r

    cdef object ns_str(self, Tag* t):
        if t.ns == NSK_SYNCML:
            return NS_SYNCML
        if t.ns == NSK_METINF:
            return NS_METINF
        if t.ns == NSK_OTHER:
            return self.uris[t.uri]
        return ""

    cdef Element element(self, Tag* t, object parent_ns):
        cdef Element e = Element.__new__(Element)
        cdef object ns = self.ns_str(t)
        cdef str txt
        cdef list kids
        e.tag = self.dec(t.local, t.llen)
        if ns != parent_ns:
            e.xmlns = ns
        if t.empty:
            self.close_empty(t)
            return e
        txt = self.content(t, self.pos, MODE_MIXED, ns)
        kids = self.kids
        self.kids = None
        if kids is not None:
            e.children = kids
            if txt.strip(" \t\r\n"):
                e.text = txt
        elif txt:
            e.text = txt
        return e

    cdef object item_data(self, Tag* t):
        """Item Data: text, or the one element it holds as an Element tree."""
        cdef str txt
        cdef list kids
        if t.empty:
            self.close_empty(t)
            return ""
        r = self.text_fast(t)
        if r is not None:
            return r
        txt = self.content(t, self.pos, MODE_MIXED, self.ns_str(t))
        kids = self.kids
        self.kids = None
        if kids is None:
            return txt
        if len(kids) != 1:
            self.fail("Data holds more than one element", t.start)
        if txt.strip(" \t\r\n"):
            self.fail("Data mixes text and an element", t.start)
        return kids[0]

    cdef int skip(self, Tag* t) except -1:
        if t.empty:
            self.close_empty(t)
        else:
            self.content(t, self.pos, MODE_SKIP, None)
        return 0

    cdef int empty(self, Tag* t) except -1:
        cdef Tag c
        if self.next_child(t, &c):
            self.fail(f"<{self.qname(t)}> must be empty", c.start)
        return 0

    # -- element dispatch -----------------------------------------------------------------

    cdef int stok(self, Tag* c) except -1:
        """Token of a SyncML element (page 0)."""
        cdef int tok
        if c.ns == NSK_SYNCML or c.ns == NSK_NONE:
            tok = lookup(self.b + c.local, c.llen)
            if tok > 0 and tok < 0x100:
                return tok
            self.fail(f"unknown element <{self.qname(c)}> in the SyncML namespace", c.start)
        if c.ns == NSK_METINF and lookup(self.b + c.local, c.llen) == S_Meta:
            return S_Meta       # <Meta xmlns="syncml:metinf"><Type>...: seen from clients
        self.fail(f"element <{self.qname(c)}> in namespace '{self.ns_str(c)}' where a SyncML "
                  "element is expected", c.start, "namespace SYNCML:SYNCML1.2")

    cdef int mtok(self, Tag* c) except -1:
        """Token of a MetInf element (accepted in syncml:metinf, or liberally unqualified)."""
        cdef int tok
        if c.ns == NSK_METINF or c.ns == NSK_SYNCML or c.ns == NSK_NONE:
            tok = lookup(self.b + c.local, c.llen)
            if tok >= 0x100:
                return tok
            self.fail(f"unknown MetInf element <{self.qname(c)}>", c.start)
        self.fail(f"element <{self.qname(c)}> in namespace '{self.ns_str(c)}' where a MetInf "
                  "element is expected", c.start, "namespace syncml:metinf")

    cdef str locator(self, Tag* t):
        """Target / Source / SourceParent / TargetParent: returns LocURI, sets self.locname."""
        cdef Tag c
        cdef str uri = None
        cdef int tok
        self.locname = None
        while self.next_child(t, &c):
            tok = self.stok(&c)
            if tok == S_LocURI:
                if uri is not None:
                    self.dup(&c)
                uri = self.text(&c)
            elif tok == S_LocName:
                if self.locname is not None:
                    self.dup(&c)
                self.locname = self.text(&c)
            else:
                self.bad_child(&c, t)
        return uri

    cdef Meta meta(self, Tag* t):
        cdef Meta m = Meta.__new__(Meta)
        cdef Tag c
        cdef int tok
        while self.next_child(t, &c):
            tok = self.mtok(&c)
            if tok == M_Format:
                if m.format is not None:
                    self.dup(&c)
                m.format = self.text(&c)
            elif tok == M_Type:
                if m.type is not None:
                    self.dup(&c)
                m.type = self.text(&c)
            elif tok == M_Size:
                if m.size is not None:
                    self.dup(&c)
                m.size = self.text(&c)
            elif tok == M_MaxMsgSize:
                if m.max_msg_size is not None:
                    self.dup(&c)
                m.max_msg_size = self.text(&c)
            elif tok == M_MaxObjSize:
                if m.max_obj_size is not None:
                    self.dup(&c)
                m.max_obj_size = self.text(&c)
            elif tok == M_NextNonce:
                if m.next_nonce is not None:
                    self.dup(&c)
                m.next_nonce = self.text(&c)
            elif tok == M_Mark:
                if m.mark is not None:
                    self.dup(&c)
                m.mark = self.text(&c)
            elif tok == M_Version:
                if m.version is not None:
                    self.dup(&c)
                m.version = self.text(&c)
            elif tok == M_Anchor or tok == M_Mem or tok == M_MetInf:
                if m.extra is None:
                    m.extra = []
                m.extra.append((NAMES[tok], self.meta_group(&c)))
            else:
                if m.extra is None:
                    m.extra = []
                m.extra.append((NAMES[tok], self.text(&c)))
        return m

    cdef list meta_group(self, Tag* t):
        cdef Tag c
        cdef int tok
        cdef list out = []
        while self.next_child(t, &c):
            tok = self.mtok(&c)
            if tok == M_Anchor or tok == M_Mem or tok == M_MetInf:
                self.bad_child(&c, t)
            out.append((NAMES[tok], self.text(&c)))
        return out


    cdef Cred cred(self, Tag* t):
        cdef Cred cr = Cred.__new__(Cred)
        cdef Tag c
        cdef int tok
        while self.next_child(t, &c):
            tok = self.stok(&c)
            if tok == S_Meta:
                if cr.meta is not None:
                    self.dup(&c)
                cr.meta = self.meta(&c)
            elif tok == S_Data:
                if cr.data is not None:
                    self.dup(&c)
                cr.data = self.text(&c)
            else:
                self.bad_child(&c, t)
        return cr

    cdef Chal chal(self, Tag* t):
        cdef Chal ch = Chal.__new__(Chal)
        cdef Tag c
        while self.next_child(t, &c):
            if self.stok(&c) == S_Meta:
                if ch.meta is not None:
                    self.dup(&c)
                ch.meta = self.meta(&c)
            else:
                self.bad_child(&c, t)
        return ch

    cdef Item item(self, Tag* t):
        cdef Item it = Item.__new__(Item)
        cdef Tag c
        cdef int tok
        while self.next_child(t, &c):
            tok = self.stok(&c)
            if tok == S_Target:
                if it.target is not None or it.target_name is not None:
                    self.dup(&c)
                it.target = self.locator(&c)
                it.target_name = self.locname
            elif tok == S_Source:
                if it.source is not None or it.source_name is not None:
                    self.dup(&c)
                it.source = self.locator(&c)
                it.source_name = self.locname
            elif tok == S_Meta:
                if it.meta is not None:
                    self.dup(&c)
                it.meta = self.meta(&c)
            elif tok == S_Data:
                if it.data is not None:
                    self.dup(&c)
                it.data = self.item_data(&c)
            elif tok == S_MoreData:
                self.empty(&c)
                it.more_data = True
            elif tok == S_SourceParent:
                if it.source_parent is not None:
                    self.dup(&c)
                it.source_parent = self.locator(&c)
            elif tok == S_TargetParent:
                if it.target_parent is not None:
                    self.dup(&c)
                it.target_parent = self.locator(&c)
            else:
                self.bad_child(&c, t)
        return it

    cdef Command other_command(self, Tag* t, int tok):
        cdef Command cmd = Command.__new__(Command)
        cdef Tag c
        cmd.name = NAMES[tok]
        while self.next_child(t, &c):
            if ((c.ns == NSK_SYNCML or c.ns == NSK_NONE) and c.llen == 5
                    and memcmp(self.b + c.local, b"CmdID", 5) == 0):
                if cmd.cmd_id is not None:
                    self.dup(&c)
                cmd.cmd_id = self.text(&c)
            else:
                self.skip(&c)
        return cmd

    cdef Command command(self, Tag* t, int tok):
        cdef Command cmd
        cdef Tag c
        cdef int k
        if not is_command(tok):
            if is_other_command(tok):
                return self.other_command(t, tok)
            self.fail(f"<{self.qname(t)}> is not a SyncBody command", t.start, "a command")
        cmd = Command.__new__(Command)
        cmd.name = NAMES[tok]
        while self.next_child(t, &c):
            k = self.stok(&c)
            if k == S_CmdID:
                if cmd.cmd_id is not None:
                    self.dup(&c)
                cmd.cmd_id = self.text(&c)
            elif k == S_Item:
                if cmd.items is None:
                    cmd.items = [self.item(&c)]
                else:
                    cmd.items.append(self.item(&c))
            elif k == S_Data:
                if cmd.data is not None:
                    self.dup(&c)
                cmd.data = self.text(&c)
            elif k == S_MsgRef:
                if cmd.msg_ref is not None:
                    self.dup(&c)
                cmd.msg_ref = self.text(&c)
            elif k == S_CmdRef:
                if cmd.cmd_ref is not None:
                    self.dup(&c)
                cmd.cmd_ref = self.text(&c)
            elif k == S_Cmd:
                if cmd.cmd is not None:
                    self.dup(&c)
                cmd.cmd = self.text(&c)
            elif k == S_TargetRef:
                if cmd.target_refs is None:
                    cmd.target_refs = [self.text(&c)]
                else:
                    cmd.target_refs.append(self.text(&c))
            elif k == S_SourceRef:
                if cmd.source_refs is None:
                    cmd.source_refs = [self.text(&c)]
                else:
                    cmd.source_refs.append(self.text(&c))
            elif k == S_Meta:
                if cmd.meta is not None:
                    self.dup(&c)
                cmd.meta = self.meta(&c)
            elif k == S_Correlator:
                if cmd.correlator is not None:
                    self.dup(&c)
                cmd.correlator = self.text(&c)
            elif k == S_NoResp:
                self.empty(&c)
                cmd.no_resp = True
            elif k == S_Cred:
                if cmd.cred is not None:
                    self.dup(&c)
                cmd.cred = self.cred(&c)
            elif k == S_Chal:
                if cmd.chal is not None:
                    self.dup(&c)
                cmd.chal = self.chal(&c)
            elif (k == S_Lang or k == S_Archive or k == S_SftDel or k == S_NoResults):
                self.skip(&c)        # valid SyncML the DM model does not carry
            elif (tok == S_Atomic or tok == S_Sequence) and (is_command(k) or is_other_command(k)):
                if cmd.commands is None:
                    cmd.commands = [self.command(&c, k)]
                else:
                    cmd.commands.append(self.command(&c, k))
            else:
                self.bad_child(&c, t)
        return cmd

    cdef SyncHdr synchdr(self, Tag* t):
        cdef SyncHdr h = SyncHdr.__new__(SyncHdr)
        cdef Tag c
        cdef int tok
        while self.next_child(t, &c):
            tok = self.stok(&c)
            if tok == S_VerDTD:
                if h.ver_dtd is not None:
                    self.dup(&c)
                h.ver_dtd = self.text(&c)
            elif tok == S_VerProto:
                if h.ver_proto is not None:
                    self.dup(&c)
                h.ver_proto = self.text(&c)
            elif tok == S_SessionID:
                if h.session_id is not None:
                    self.dup(&c)
                h.session_id = self.text(&c)
            elif tok == S_MsgID:
                if h.msg_id is not None:
                    self.dup(&c)
                h.msg_id = self.text(&c)
            elif tok == S_Target:
                if h.target is not None or h.target_name is not None:
                    self.dup(&c)
                h.target = self.locator(&c)
                h.target_name = self.locname
            elif tok == S_Source:
                if h.source is not None or h.source_name is not None:
                    self.dup(&c)
                h.source = self.locator(&c)
                h.source_name = self.locname
            elif tok == S_RespURI:
                if h.resp_uri is not None:
                    self.dup(&c)
                h.resp_uri = self.text(&c)
            elif tok == S_NoResp:
                self.empty(&c)
                h.no_resp = True
            elif tok == S_Cred:
                if h.cred is not None:
                    self.dup(&c)
                h.cred = self.cred(&c)
            elif tok == S_Meta:
                if h.meta is not None:
                    self.dup(&c)
                h.meta = self.meta(&c)
            else:
                self.bad_child(&c, t)
        return h

    cdef int syncbody(self, Tag* t, Message msg) except -1:
        cdef Tag c
        cdef int tok
        cdef list cmds = msg.commands
        while self.next_child(t, &c):
            tok = self.stok(&c)
            if tok == S_Final:
                if msg.final:
                    self.dup(&c)
                self.empty(&c)
                msg.final = True
            else:
                cmds.append(self.command(&c, tok))
        return 0

    # -- document -------------------------------------------------------------------------

    cdef int xml_decl(self, Py_ssize_t at) except -1:
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t i = at + 5, s, ve
        cdef int seen = 0
        while True:
            if not is_ws(b[i]):
                if b[i] == c'?' and b[i + 1] == c'>':
                    break
                if i >= self.end:
                    self.truncated("'?>'")
                self.fail("malformed XML declaration", i)
            while is_ws(b[i]):
                i += 1
            if b[i] == c'?' and b[i + 1] == c'>':
                break
            s = i
            while NAMEC[b[i]]:
                i += 1
            name = self.dec(s, i - s)
            while is_ws(b[i]):
                i += 1
            if b[i] != c'=':
                if i >= self.end:
                    self.truncated("'='")
                self.fail("malformed XML declaration", i, "'='")
            i += 1
            while is_ws(b[i]):
                i += 1
            ve = self.quoted(i)
            self.check_chars(i + 1, ve)
            value = self.dec(i + 1, ve - i - 1)
            if name == "version" and seen == 0:
                if value not in ("1.0", "1.1"):
                    self.fail(f"unsupported XML version {value!r}", i + 1, "1.0")
                seen = 1
            elif name == "encoding" and seen == 1:
                if value.lower() not in ("utf-8", "utf8"):
                    self.fail(f"unsupported encoding {value!r}: SyncML DM XML must be UTF-8",
                              i + 1, "UTF-8")
                seen = 2
            elif name == "standalone" and (seen == 1 or seen == 2):
                if value not in ("yes", "no"):
                    self.fail("malformed standalone declaration", i + 1, "yes or no")
                seen = 3
            else:
                self.fail(f"unexpected {name!r} in the XML declaration", s)
            i = ve + 1
        if seen == 0:
            self.fail("XML declaration without version", at, "version")
        self.pos = i + 2
        return 0

    cdef int doctype(self, Py_ssize_t i) except -1:
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t j = i + 9
        if not is_ws(b[j]):
            self.fail("malformed DOCTYPE", j)
        while is_ws(b[j]):
            j += 1
        if NAMEC[b[j]] != 3:
            self.fail("malformed DOCTYPE", j, "a name")
        while NAMEC[b[j]]:
            j += 1
        while is_ws(b[j]):
            j += 1
        if j + 6 <= self.end and memcmp(b + j, b"PUBLIC", 6) == 0:
            j += 6
            while is_ws(b[j]):
                j += 1
            j = self.quoted(j) + 1
            self.check_chars(i, j)
            while is_ws(b[j]):
                j += 1
            if b[j] == c'"' or b[j] == c"'":
                j = self.quoted(j) + 1
        elif j + 6 <= self.end and memcmp(b + j, b"SYSTEM", 6) == 0:
            j += 6
            while is_ws(b[j]):
                j += 1
            j = self.quoted(j) + 1
        self.check_chars(i, j)
        while is_ws(b[j]):
            j += 1
        if b[j] == c'[':
            self.fail("DOCTYPE with an internal subset refused (no DTDs or entity declarations)",
                      j)
        if b[j] != c'>':
            if j >= self.end:
                self.truncated("'>'")
            self.fail("malformed DOCTYPE", j, "'>'")
        return j + 1

    cdef int misc(self, bint before_root) except -1:
        """Skips whitespace, comments, PIs (and one DOCTYPE before the root)."""
        cdef const unsigned char* b = self.b
        cdef Py_ssize_t i = self.pos
        cdef bint seen_doctype = False
        while True:
            while is_ws(b[i]):
                i += 1
            if i >= self.end:
                self.pos = i
                return 0
            if b[i] != c'<':
                self.fail("text outside the root element" if before_root else
                          "junk after the root element", i, "'<'" if before_root else "end of document")
            if i + 4 <= self.end and memcmp(b + i, b"<!--", 4) == 0:
                i = self.skip_comment(i)
            elif b[i + 1] == c'?':
                i = self.skip_pi(i)
            elif before_root and i + 9 <= self.end and memcmp(b + i, b"<!DOCTYPE", 9) == 0:
                if seen_doctype:
                    self.fail("second DOCTYPE", i)
                seen_doctype = True
                i = self.doctype(i)
            elif before_root and b[i + 1] == c'!' and i + 9 > self.end:
                self.truncated("the root element")
            elif before_root and b[i + 1] != c'!' and b[i + 1] != c'/':
                self.pos = i
                return 0
            else:
                self.fail("unexpected markup outside the root element" if before_root else
                          "junk after the root element", i)

    cdef Message document(self):
        cdef const unsigned char* b = self.b
        cdef Tag t, c
        cdef int tok
        cdef Message msg
        cdef bint seen_body = False
        if self.end == 0:
            self.fail("empty document", 0, "'<SyncML'")
        if self.end >= 3 and b[0] == 0xEF and b[1] == 0xBB and b[2] == 0xBF:
            self.pos = 3
        elif self.end >= 2 and ((b[0] == 0xFE and b[1] == 0xFF) or (b[0] == 0xFF and b[1] == 0xFE)
                                or b[0] == 0 or b[1] == 0):
            self.fail("not UTF-8 (UTF-16 or UCS-4 byte order?)", 0, "UTF-8")
        if self.end - self.pos >= 6 and memcmp(b + self.pos, b"<?xml", 5) == 0 and is_ws(b[self.pos + 5]):
            self.xml_decl(self.pos)
        self.misc(True)
        if self.pos >= self.end:
            self.truncated("the root element <SyncML>")
        self.start_tag(&t)
        if (lookup(b + t.local, t.llen) != S_SyncML
                or not (t.ns == NSK_SYNCML or t.ns == NSK_NONE)):
            self.fail(f"root element is <{self.qname(&t)}> in namespace '{self.ns_str(&t)}'",
                      t.start, "<SyncML xmlns=\"SYNCML:SYNCML1.2\">")
        msg = Message.__new__(Message)
        msg.commands = []
        while self.next_child(&t, &c):
            tok = self.stok(&c)
            if tok == S_SyncHdr:
                if msg.hdr is not None:
                    self.dup(&c)
                msg.hdr = self.synchdr(&c)
            elif tok == S_SyncBody:
                if seen_body:
                    self.dup(&c)
                if msg.hdr is None:
                    self.fail("<SyncBody> before <SyncHdr>", c.start, "<SyncHdr>")
                seen_body = True
                self.syncbody(&c, msg)
            else:
                self.bad_child(&c, &t)
        if msg.hdr is None:
            self.fail("no <SyncHdr>", t.start, "<SyncHdr>")
        if not seen_body:
            self.fail("no <SyncBody>", t.start, "<SyncBody>")
        self.misc(False)
        return msg


def decode(bytes data not None, *, int max_depth=DEFAULT_MAX_DEPTH,
           Py_ssize_t max_size=DEFAULT_MAX_SIZE):
    """Decodes one SyncML DM message in XML; raises CodecError on bad input."""
    cdef _Reader r
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if max_depth > MAX_DEPTH_CAP:
        raise ValueError(f"max_depth above {MAX_DEPTH_CAP}")
    if n > max_size:
        raise CodecError(f"message of {n} bytes is larger than max_size={max_size}",
                         offset=max_size, expected=f"at most {max_size} bytes")
    r = _Reader.__new__(_Reader)
    r.src = data
    r.b = <const unsigned char*>PyBytes_AS_STRING(data)
    r.end = n
    r.pos = 0
    r.depth = 0
    r.max_depth = max_depth
    r.nscopes = 0
    r.uris = []
    return r.document()


# ---------------------------------------------------------------------------------------
# encoder



cdef set _EXTRA_OK = set(METINF_EXTRA | METINF_GROUPS)
cdef set _GROUP_OK = set(_METINF_NAMES.values()) - set(METINF_GROUPS)


cdef bint _valid_name(str s):
    cdef bytes bs = s.encode("utf-8", "surrogatepass")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(bs)
    cdef Py_ssize_t n = len(bs), i
    if n == 0 or NAMEC[p[0]] != 3 or p[0] == c':':
        return False
    for i in range(n):
        if NAMEC[p[i]] == 0 or p[i] == c':':
            return False
    return True



@cython.final
cdef class _Writer:
    cdef char* buf
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef int nest
    cdef long next_id       # Message.number_commands: the CmdID for a command without one (0: off)

    cdef int enter(self) except -1:
        self.nest += 1
        if self.nest > ENC_NEST:
            raise CodecError(f"commands or Elements nested deeper than {ENC_NEST} "
                             "(cyclic model?)")
        return 0

    def __cinit__(self):
        self.cap = 4096
        self.n = 0
        self.buf = <char*>malloc(self.cap)
        if self.buf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.buf != NULL:
            free(self.buf)

    cdef int grow(self, Py_ssize_t k) except -1:
        cdef Py_ssize_t cap = self.cap * 2
        cdef char* p
        while cap < self.n + k:
            cap *= 2
        p = <char*>realloc(self.buf, cap)
        if p == NULL:
            raise MemoryError()
        self.buf = p
        self.cap = cap
        return 0

    cdef inline int raw(self, const char* s, Py_ssize_t k) except -1:
        if self.n + k > self.cap:
            self.grow(k)
        memcpy(self.buf + self.n, s, k)
        self.n += k
        return 0

    cdef inline int lit(self, const char* s) except -1:
        return self.raw(s, strlen(s))

    cdef int esc(self, str s, bint attr) except -1:
        cdef Py_ssize_t k, i = 0, r = 0
        cdef const unsigned char* p
        cdef unsigned char e
        p = <const unsigned char*>PyUnicode_AsUTF8AndSize(s, &k)
        if p == NULL:
            PyErr_Clear()
            raise CodecError("text cannot be encoded as UTF-8 (lone surrogate)")
        while i < k:
            e = ESC[p[i]]
            if e == E_OK:
                i += 1
                continue
            if e == E_EF:
                if i + 2 < k and p[i + 1] == 0xBF and (p[i + 2] == 0xBE or p[i + 2] == 0xBF):
                    raise CodecError("U+FFFE/U+FFFF cannot be carried in XML")
                i += 1
                continue
            if (e == E_QUOT or e == E_WS) and not attr:
                i += 1
                continue
            if e == E_BAD:
                raise CodecError(f"character U+{p[i]:04X} cannot be carried in XML 1.0 "
                                 "(use Format b64)")
            self.raw(<const char*>p + r, i - r)
            if e == E_AMP:
                self.lit("&amp;")
            elif e == E_LT:
                self.lit("&lt;")
            elif e == E_GT:
                self.lit("&gt;")
            elif e == E_CR:
                self.lit("&#13;")
            elif e == E_QUOT:
                self.lit("&quot;")
            elif p[i] == 9:
                self.lit("&#9;")
            else:
                self.lit("&#10;")
            i += 1
            r = i
        self.raw(<const char*>p + r, k - r)
        return 0

    cdef int leaf(self, const char* name, str v) except -1:
        cdef Py_ssize_t nl = strlen(name)
        self.lit("<")
        self.raw(name, nl)
        if not v:
            self.lit("/>")
            return 0
        self.lit(">")
        self.esc(v, False)
        self.lit("</")
        self.raw(name, nl)
        self.lit(">")
        return 0

    cdef int mleaf(self, const char* name, str v) except -1:
        cdef Py_ssize_t nl = strlen(name)
        self.lit("<")
        self.raw(name, nl)
        if not v:
            self.lit(' xmlns="syncml:metinf"/>')
            return 0
        self.lit(' xmlns="syncml:metinf">')
        self.esc(v, False)
        self.lit("</")
        self.raw(name, nl)
        self.lit(">")
        return 0

    cdef int ext_name(self, object name, set allowed) except -1:
        if not isinstance(name, str) or name not in allowed:
            raise CodecError(f"Meta.extra: {name!r} is not a MetInf element it can carry")
        return 0

    cdef int meta(self, Meta m) except -1:
        cdef bytes bn
        self.lit("<Meta>")
        if m.format is not None:
            self.mleaf("Format", m.format)
        if m.type is not None:
            self.mleaf("Type", m.type)
        if m.mark is not None:
            self.mleaf("Mark", m.mark)
        if m.size is not None:
            self.mleaf("Size", m.size)
        if m.version is not None:
            self.mleaf("Version", m.version)
        if m.next_nonce is not None:
            self.mleaf("NextNonce", m.next_nonce)
        if m.max_msg_size is not None:
            self.mleaf("MaxMsgSize", m.max_msg_size)
        if m.max_obj_size is not None:
            self.mleaf("MaxObjSize", m.max_obj_size)
        if m.extra is not None:
            for entry in m.extra:
                if not isinstance(entry, tuple) or len(entry) != 2:
                    raise CodecError(f"Meta.extra entries are (name, value) pairs, not {entry!r}")
                name, value = entry
                self.ext_name(name, _EXTRA_OK)
                bn = (<str>name).encode()
                if isinstance(value, str):
                    if name in METINF_GROUPS:
                        raise CodecError(f"Meta.extra: {name} holds a list of (name, value)")
                    self.mleaf(bn, value)
                elif isinstance(value, list):
                    if name not in METINF_GROUPS:
                        raise CodecError(f"Meta.extra: {name} holds a str")
                    self.lit("<")
                    self.lit(bn)
                    self.lit(' xmlns="syncml:metinf">')
                    for sub in value:
                        if (not isinstance(sub, tuple) or len(sub) != 2
                                or not isinstance(sub[1], str)):
                            raise CodecError(f"Meta.extra: bad {name} entry {sub!r}")
                        self.ext_name(sub[0], _GROUP_OK)
                        self.leaf((<str>sub[0]).encode(), sub[1])
                    self.lit("</")
                    self.lit(bn)
                    self.lit(">")
                else:
                    raise CodecError(f"Meta.extra: bad value {value!r} for {name}")
        self.lit("</Meta>")
        return 0

    cdef int loc(self, const char* name, str uri, str locname) except -1:
        if uri is None and locname is None:
            return 0
        self.lit("<")
        self.lit(name)
        self.lit(">")
        if uri is not None:
            self.leaf("LocURI", uri)
        if locname is not None:
            self.leaf("LocName", locname)
        self.lit("</")
        self.lit(name)
        self.lit(">")
        return 0

    cdef int cred(self, Cred c) except -1:
        self.lit("<Cred>")
        if c.meta is not None:
            self.meta(c.meta)
        if c.data is not None:
            self.text_data(c.data, False)
        self.lit("</Cred>")
        return 0

    cdef int text_data(self, object d, bint allow_element) except -1:
        cdef str s
        if isinstance(d, str):
            self.leaf("Data", <str>d)
        elif isinstance(d, bytes):
            try:
                s = (<bytes>d).decode("utf-8")
            except UnicodeDecodeError:
                raise CodecError("binary Data that is not UTF-8 cannot be carried in XML "
                                 "(send it with Format b64)") from None
            if not s:
                self.lit("<Data/>")
            elif "]]>" in s or "\r" in s:
                self.leaf("Data", s)
            else:
                self.lit("<Data><![CDATA[")
                self.esc_check(s)
                self.lit("]]></Data>")
        elif allow_element and isinstance(d, Element):
            self.lit("<Data>")
            self.element(<Element>d)
            self.lit("</Data>")
        else:
            raise CodecError(f"cannot encode Data of type {type(d).__name__}")
        return 0

    cdef int esc_check(self, str s) except -1:
        """Writes s raw (inside CDATA) after checking that XML can carry every character."""
        cdef Py_ssize_t k, i
        cdef const unsigned char* p = <const unsigned char*>PyUnicode_AsUTF8AndSize(s, &k)
        cdef unsigned char e
        if p == NULL:
            PyErr_Clear()
            raise CodecError("text cannot be encoded as UTF-8 (lone surrogate)")
        for i in range(k):
            e = ESC[p[i]]
            if e == E_BAD:
                raise CodecError(f"character U+{p[i]:04X} cannot be carried in XML 1.0 "
                                 "(use Format b64)")
            if e == E_EF and i + 2 < k and p[i + 1] == 0xBF and (p[i + 2] == 0xBE or p[i + 2] == 0xBF):
                raise CodecError("U+FFFE/U+FFFF cannot be carried in XML")
        return self.raw(<const char*>p, k)

    cdef int element(self, Element e) except -1:
        cdef bytes tag
        if not isinstance(e.tag, str) or not _valid_name(e.tag):
            raise CodecError(f"Element tag {e.tag!r} is not an XML name")
        tag = (<str>e.tag).encode()
        self.enter()
        self.lit("<")
        self.lit(tag)
        if e.xmlns is not None:
            self.lit(' xmlns="')
            self.esc(e.xmlns, True)
            self.lit('"')
        if e.text is None and not e.children:
            self.lit("/>")
            self.nest -= 1
            return 0
        self.lit(">")
        if e.text is not None:
            self.esc(e.text, False)
        if e.children:
            for ch in e.children:
                if not isinstance(ch, Element):
                    raise CodecError(f"Element children must be Elements, not {type(ch).__name__}")
                self.element(<Element>ch)
        self.lit("</")
        self.lit(tag)
        self.lit(">")
        self.nest -= 1
        return 0

    cdef int item(self, Item it) except -1:
        self.lit("<Item>")
        self.loc("Target", it.target, it.target_name)
        self.loc("Source", it.source, it.source_name)
        if it.source_parent is not None:
            self.loc("SourceParent", it.source_parent, None)
        if it.target_parent is not None:
            self.loc("TargetParent", it.target_parent, None)
        if it.meta is not None:
            self.meta(it.meta)
        if it.data is not None:
            self.text_data(it.data, True)
        if it.more_data:
            self.lit("<MoreData/>")
        self.lit("</Item>")
        return 0

    cdef int command(self, Command c) except -1:
        cdef bytes name
        cdef bint results
        if not isinstance(c.name, str) or (c.name not in COMMANDS and c.name not in OTHER_COMMANDS):
            raise CodecError(f"cannot encode command {c.name!r}")
        name = (<str>c.name).encode()
        results = c.name == "Results"
        self.enter()
        self.lit("<")
        self.lit(name)
        self.lit(">")
        if self.next_id > 0:
            self.cmd_id(c.cmd_id)
        elif c.cmd_id is not None:
            self.leaf("CmdID", c.cmd_id)
        if c.no_resp:
            self.lit("<NoResp/>")
        if c.msg_ref is not None:
            self.leaf("MsgRef", c.msg_ref)
        if c.cmd_ref is not None:
            self.leaf("CmdRef", c.cmd_ref)
        if c.cmd is not None:
            self.leaf("Cmd", c.cmd)
        if results and c.meta is not None:
            self.meta(c.meta)
        if c.target_refs is not None:
            for v in c.target_refs:
                self.leaf("TargetRef", v)
        if c.source_refs is not None:
            for v in c.source_refs:
                self.leaf("SourceRef", v)
        if c.cred is not None:
            self.cred(c.cred)
        if c.chal is not None:
            self.lit("<Chal>")
            if c.chal.meta is not None:
                self.meta(c.chal.meta)
            self.lit("</Chal>")
        if not results and c.meta is not None:
            self.meta(c.meta)
        if c.data is not None:
            self.text_data(c.data, False)
        if c.correlator is not None:
            self.leaf("Correlator", c.correlator)
        if c.items is not None:
            for it in c.items:
                if not isinstance(it, Item):
                    raise CodecError(f"Command.items must hold Items, not {type(it).__name__}")
                self.item(<Item>it)
        if c.commands is not None:
            for sub in c.commands:
                if not isinstance(sub, Command):
                    raise CodecError(f"Command.commands must hold Commands, not {type(sub).__name__}")
                self.command(<Command>sub)
        self.lit("</")
        self.lit(name)
        self.lit(">")
        self.nest -= 1
        return 0

    cdef int cmd_id(self, str given) except -1:
        """CmdID under Message.number_commands: the given one or the next number."""
        cdef char digits[24]
        cdef int n = next_cmd_id(&self.next_id, given, digits)
        if n == 0:
            return self.leaf("CmdID", given)
        self.lit("<CmdID>")
        self.raw(digits, n)
        return self.lit("</CmdID>")

    cdef int message(self, Message m) except -1:
        cdef SyncHdr h = m.hdr
        if h is None:
            raise CodecError("Message.hdr is None")
        self.next_id = 1 if m.number_commands else 0
        self.lit('<?xml version="1.0" encoding="UTF-8"?>')
        if h.ver_dtd == "1.1":
            self.lit('<SyncML xmlns="SYNCML:SYNCML1.1"><SyncHdr>')
        else:
            self.lit('<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr>')
        if h.ver_dtd is not None:
            self.leaf("VerDTD", h.ver_dtd)
        if h.ver_proto is not None:
            self.leaf("VerProto", h.ver_proto)
        if h.session_id is not None:
            self.leaf("SessionID", h.session_id)
        if h.msg_id is not None:
            self.leaf("MsgID", h.msg_id)
        self.loc("Target", h.target, h.target_name)
        self.loc("Source", h.source, h.source_name)
        if h.resp_uri is not None:
            self.leaf("RespURI", h.resp_uri)
        if h.no_resp:
            self.lit("<NoResp/>")
        if h.cred is not None:
            self.cred(h.cred)
        if h.meta is not None:
            self.meta(h.meta)
        self.lit("</SyncHdr><SyncBody>")
        if m.commands is not None:
            for c in m.commands:
                if not isinstance(c, Command):
                    raise CodecError(f"Message.commands must hold Commands, not {type(c).__name__}")
                self.command(<Command>c)
        if m.final:
            self.lit("<Final/>")
        self.lit("</SyncBody></SyncML>")
        return 0


def encode(Message msg not None):
    """Encodes a message as compact UTF-8 XML; raises CodecError if XML cannot carry it."""
    cdef _Writer w = _Writer.__new__(_Writer)
    w.message(msg)
    return PyBytes_FromStringAndSize(w.buf, w.n)
