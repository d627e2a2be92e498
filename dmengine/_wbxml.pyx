# cython: language_level=3
# (boundscheck, wraparound, initializedcheck and cdivision come from setup.py, so that
#  DMENGINE_DEBUG=1 can turn the checks on; build with `make build`, not bare cythonize)
"""WBXML codec for SyncML DM messages (L1): bytes <-> dmengine.message.Message.

decode() accepts WBXML 1.0-1.3, public ids SyncML 1.1 (0x0FD3) and 1.2 (0x1201), numeric or
as a literal FPI in the string table (compared case-insensitively; '_' is read as ' '),
charset UTF-8 (106) or 0 ("unknown", read as UTF-8 and validated as such), code pages 0
(SyncML) and 1 (MetInf), STR_I / STR_T / OPAQUE / ENTITY pieces (concatenated), and a nested
WBXML document inside an Item's Data when the Meta Type in force (the Item's, else the
command's) is application/vnd.syncml.dmtnds+wbxml (TNDS: DM DDF tags, code page 2) or
application/vnd.syncml-devinf+wbxml (DevInf, code page 0); it becomes an Element tree.  OPAQUE
Data that is valid UTF-8 becomes str, other OPAQUE Data stays bytes.

Everything else raises CodecError(reason, offset=..., expected=...): truncation, unknown
version / public id / charset / code page / token / tag, attributes and LITERAL tags, an
mb_u_int32 over 5 bytes or 0xFFFFFFFF, lengths and string-table offsets beyond the data
(checked before anything is allocated), unbalanced END, trailing bytes, invalid UTF-8,
nesting deeper than max_depth, input over max_size, a string over max_string.

encode() writes WBXML 1.3, public id 0x1201, UTF-8, elements in SyncML DTD order, str as
STR_I (OPAQUE when it holds a NUL), bytes as OPAQUE, Element Data as a nested TNDS or
DevInf document in OPAQUE (a +xml Type in force is written as +wbxml, as libwbxml does;
Element Data must sit in an Item, under such a Type, with the root's xmlns naming the
document and no xmlns below it, so that decode() gives the same model back); string_table=True moves repeated strings to the string table (STR_T).
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcpy

from dmengine._message cimport Chal, Command, Cred, Element, Item, Message, Meta, SyncHdr
from dmengine._decimal cimport next_cmd_id

from dmengine import _tokens
from dmengine.errors import CodecError

include "_tokens.pxi"

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

# --- limits (keyword parameters of decode(), these are the defaults) ----------------------
DEFAULT_MAX_DEPTH = 32              # element nesting, counting SyncML as 1
DEFAULT_MAX_SIZE = 4 * 1024 * 1024  # bytes of one message (nested documents included)
DEFAULT_MAX_STRING = 1024 * 1024    # bytes of one text value or Data after concatenation
# STR_T is the one piece whose text can be larger than its bytes: a 2-byte reference copies a
# whole string-table entry, so 17 KB could decode to megabytes.  The text copied out of the
# string table is budgeted per message: this many times the message's size (and at least
# DEFAULT_MIN_DECODED), unless decode() is given max_decoded.
DEFAULT_DECODED_RATIO = 8
DEFAULT_MIN_DECODED = 64 * 1024
ENCODE_MAX_NESTING = 256            # guards encode() against cyclic models

TNDS_WBXML = "application/vnd.syncml.dmtnds+wbxml"
TNDS_XML = "application/vnd.syncml.dmtnds+xml"
DEVINF_WBXML = "application/vnd.syncml-devinf+wbxml"
DEVINF_XML = "application/vnd.syncml-devinf+xml"
DDF_NAMESPACE = _tokens.PAGES["dmddf"][2][0]
DDF_FPI = _tokens.FPIS["DMDDF_1_2"]
DEVINF_NAMESPACE = _tokens.PAGES["devinf"][0][0]

cdef int K_END = -1      # next_tag(): END consumed
cdef int K_TEXT = -2     # next_tag(): a text token is next (not consumed)
cdef int K_ERR = -100    # error return of int functions

cdef enum Lang:
    LANG_SYNCML = 0
    LANG_DDF = 1         # nested TNDS document: DM DDF tags on code page 2
    LANG_DEVINF = 2      # nested DevInf document: DevInf tags on code page 0


def _norm_fpi(s):
    return " ".join(s.replace("_", " ").upper().split())


_SYNCML_FPIS = {
    _norm_fpi(_tokens.PUBLIC_IDS[PUBID_SYNCML_1_1]): PUBID_SYNCML_1_1,
    _norm_fpi(_tokens.PUBLIC_IDS[PUBID_SYNCML_1_2]): PUBID_SYNCML_1_2,
}
_DDF_FPI_NORM = _norm_fpi(DDF_FPI)
_DEVINF_FPIS = {_norm_fpi(_tokens.PUBLIC_IDS[v]): v
                for v in (PUBID_DEVINF_1_0, PUBID_DEVINF_1_1, PUBID_DEVINF_1_2)}


cdef tuple _names(str lang, int page):
    """Element names of one code page as a 64-entry tuple indexed by tag id (None = unknown)."""
    names = [None] * 64
    for value, name in _tokens.PAGES[lang][page][1].items():
        names[value] = name
    return tuple(names)


cdef tuple S_NAMES = _names("syncml", 0)
cdef tuple M_NAMES = _names("syncml", 1)
cdef tuple D_NAMES = _names("dmddf", 2)
cdef tuple V_NAMES = _names("devinf", 0)
cdef dict M_KEYS = {name: 64 + v for v, name in _tokens.PAGES["syncml"][1][1].items()}
cdef dict D_KEYS = {name: 128 + v for v, name in _tokens.PAGES["dmddf"][2][1].items()}
cdef dict V_KEYS = {name: v for v, name in _tokens.PAGES["devinf"][0][1].items()}
cdef dict S_COMMAND_KEYS = {S_NAMES[k]: k for k in (
    S_Add, S_Alert, S_Atomic, S_Copy, S_Delete, S_Exec, S_Get, S_Replace, S_Sequence,
    S_Status, S_Results)}
# MetInf elements with a field of their own in Meta; any other goes to Meta.extra.
cdef frozenset META_FIELDS = frozenset({
    "Format", "Type", "Mark", "Size", "MaxMsgSize", "MaxObjSize", "NextNonce", "Version"})

cdef str EMPTY = ""


cdef str _tag_name(int key, int lang=LANG_SYNCML):
    cdef int page = key >> 6, tag = key & 0x3F
    cdef object name = None
    if page == 0:
        name = V_NAMES[tag] if lang == LANG_DEVINF else S_NAMES[tag]
    elif page == 1:
        name = M_NAMES[tag]
    elif page == 2:
        name = D_NAMES[tag]
    if name is None:
        return f"unknown tag 0x{tag:02X} on code page {page}"
    return f"<{name}>"


cdef int _raise(str reason, Py_ssize_t offset, str expected=None) except -1:
    raise CodecError(reason, offset=offset, expected=expected)


# =========================================================================================
# Decoder
# =========================================================================================

@cython.final
@cython.freelist(4)
cdef class _Decoder:
    cdef object data                  # keeps the buffer alive
    cdef const unsigned char* buf
    cdef Py_ssize_t pos, end
    cdef const unsigned char* st      # string table (points into buf)
    cdef Py_ssize_t st_len, st_pos
    cdef Py_ssize_t st_budget         # bytes STR_T references may still copy (max_decoded)
    cdef int page, lang, depth, max_depth
    cdef Py_ssize_t max_string
    cdef bint content                 # content bit of the tag next_tag() returned
    cdef Py_ssize_t tagpos            # offset of that tag
    cdef Py_ssize_t publicid
    # OPAQUE pieces of the last text(); op_single: it was exactly one OPAQUE piece
    cdef int op_count
    cdef bint op_single
    cdef Py_ssize_t op_start, op_len
    # scratch buffer for text made of several pieces
    cdef unsigned char* tmp
    cdef Py_ssize_t tmp_len, tmp_cap
    # LocURI / LocName of the last loc()
    cdef str loc_uri, loc_name

    def __dealloc__(self):
        if self.tmp != NULL:
            free(self.tmp)

    # --- low level -----------------------------------------------------------------------

    cdef int truncated(self, str expected) except -1:
        return _raise("truncated", self.end, expected)

    cdef Py_ssize_t mbuint(self) except -1:
        cdef unsigned long long v = 0
        cdef Py_ssize_t start = self.pos
        cdef unsigned char b
        cdef int i
        for i in range(5):
            if self.pos >= self.end:
                self.truncated("mb_u_int32")
            b = self.buf[self.pos]
            self.pos += 1
            v = (v << 7) | (b & 0x7F)
            if not (b & 0x80):
                if v > 0xFFFFFFFFULL:
                    _raise("mb_u_int32 above 0xFFFFFFFF", start, "a 32-bit value")
                return <Py_ssize_t>v
        return _raise("mb_u_int32 longer than 5 bytes", start, "at most 5 bytes")

    cdef int switch_page(self) except -1:
        # at SWITCH_PAGE
        cdef int p
        if self.pos + 1 >= self.end:
            self.truncated("code page number")
        p = self.buf[self.pos + 1]
        if self.lang == LANG_SYNCML:
            if p > 1:
                _raise(f"unknown code page {p}", self.pos + 1, "code page 0 (SyncML) or 1 (MetInf)")
        elif self.lang == LANG_DDF:
            if p != 2 and p != 0:
                _raise(f"unknown code page {p}", self.pos + 1, "code page 2 (DM DDF)")
        elif p != 0:
            _raise(f"unknown code page {p}", self.pos + 1, "code page 0 (DevInf)")
        self.page = p
        self.pos += 2
        return 0

    cdef int next_tag(self) except -100:
        """Skips SWITCH_PAGE; returns a tag key (page*64+id, setting self.content), K_END
        (consumed) or K_TEXT (not consumed)."""
        cdef unsigned char b
        while True:
            if self.pos >= self.end:
                self.truncated("a tag or END")
            b = self.buf[self.pos]
            if (b & 0x3F) < 5:          # a global token
                if b == TOK_END:
                    self.pos += 1
                    return K_END
                if b == TOK_SWITCH_PAGE:
                    self.switch_page()
                    continue
                if b == TOK_STR_I or b == TOK_STR_T or b == TOK_OPAQUE or b == TOK_ENTITY:
                    return K_TEXT
                _raise(f"unsupported token 0x{b:02X}", self.pos, "a SyncML tag, text or END")
            if b & 0x80:
                _raise("tag with attributes", self.pos, "a tag without attributes")
            self.tagpos = self.pos
            self.pos += 1
            self.content = (b & 0x40) != 0
            return self.page * 64 + (b & 0x3F)

    cdef int unexpected(self, int key, str parent) except -1:
        if key == K_TEXT:
            return _raise(f"unexpected text in <{parent}>", self.pos, "an element or END")
        return _raise(f"unexpected {_tag_name(key)} in <{parent}>", self.tagpos)

    cdef inline int enter(self) except -1:
        self.depth += 1
        if self.depth > self.max_depth:
            _raise(f"nesting deeper than max_depth={self.max_depth}", self.tagpos)
        return 0

    cdef int tmp_append(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t need = self.tmp_len + n
        cdef Py_ssize_t cap
        cdef unsigned char* nb
        if need > self.max_string:
            _raise(f"text longer than max_string={self.max_string}", self.pos)
        if need > self.tmp_cap:
            cap = self.tmp_cap * 2 if self.tmp_cap else 256
            while cap < need:
                cap *= 2
            nb = <unsigned char*>realloc(self.tmp, cap)
            if nb == NULL:
                raise MemoryError()
            self.tmp = nb
            self.tmp_cap = cap
        memcpy(self.tmp + self.tmp_len, p, n)
        self.tmp_len = need
        return 0

    cdef str utf8(self, const unsigned char* p, Py_ssize_t n, Py_ssize_t offset):
        try:
            return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
        except UnicodeDecodeError as e:
            _raise("invalid UTF-8", offset + e.start, "UTF-8 text")

    cdef Py_ssize_t cstr_end(self, const unsigned char* base, Py_ssize_t start, Py_ssize_t end,
                             Py_ssize_t errpos, str what) except -1:
        """Length of the NUL-terminated string at base[start:end]."""
        cdef const unsigned char* z = <const unsigned char*>memchr(base + start, 0, end - start)
        if z == NULL:
            _raise(f"unterminated {what}", errpos, "a NUL terminator")
        return z - (base + start)

    # --- text ----------------------------------------------------------------------------

    cdef int pieces(self) except -1:
        """Reads STR_I / STR_T / ENTITY / OPAQUE pieces (and SWITCH_PAGE) into tmp until any
        other token, which is left unread.  Returns the number of OPAQUE pieces; records the
        single-OPAQUE case in op_single/op_start/op_len."""
        cdef unsigned char b
        cdef Py_ssize_t n, off, start
        cdef int count = 0, opaque = 0
        cdef unsigned long cp
        cdef unsigned char u[4]
        self.op_single = False
        while True:
            if self.pos >= self.end:
                self.truncated("text or END")
            b = self.buf[self.pos]
            if b == TOK_STR_I:
                start = self.pos + 1
                n = self.cstr_end(self.buf, start, self.end, self.pos, "inline string (STR_I)")
                self.tmp_append(self.buf + start, n)
                self.pos = start + n + 1
            elif b == TOK_STR_T:
                start = self.pos
                self.pos += 1
                off = self.mbuint()
                if off >= self.st_len:
                    _raise(f"string table offset {off} out of range (table has {self.st_len} bytes)",
                           start, "an offset inside the string table")
                n = self.cstr_end(self.st, off, self.st_len, start, "string-table entry")
                if n > self.st_budget:
                    _raise("string-table references decoded past the message's budget "
                           "(max_decoded)", start, "fewer string-table references")
                self.st_budget -= n
                self.tmp_append(self.st + off, n)
            elif b == TOK_OPAQUE:
                self.pos += 1
                n = self.mbuint()
                if n > self.end - self.pos:
                    _raise(f"OPAQUE length {n} beyond the {self.end - self.pos} bytes left",
                           self.pos, "a length inside the data")
                self.op_start = self.pos
                self.op_len = n
                self.tmp_append(self.buf + self.pos, n)
                self.pos += n
                opaque += 1
            elif b == TOK_ENTITY:
                start = self.pos
                self.pos += 1
                cp = <unsigned long>self.mbuint()
                if cp > 0x10FFFF or (0xD800 <= cp <= 0xDFFF) or cp == 0:
                    _raise(f"ENTITY U+{cp:X} is not a character", start, "a Unicode scalar value")
                if cp < 0x80:
                    u[0] = <unsigned char>cp
                    n = 1
                elif cp < 0x800:
                    u[0] = 0xC0 | (cp >> 6); u[1] = 0x80 | (cp & 0x3F)
                    n = 2
                elif cp < 0x10000:
                    u[0] = 0xE0 | (cp >> 12); u[1] = 0x80 | ((cp >> 6) & 0x3F); u[2] = 0x80 | (cp & 0x3F)
                    n = 3
                else:
                    u[0] = 0xF0 | (cp >> 18); u[1] = 0x80 | ((cp >> 12) & 0x3F)
                    u[2] = 0x80 | ((cp >> 6) & 0x3F); u[3] = 0x80 | (cp & 0x3F)
                    n = 4
                self.tmp_append(u, n)
            elif b == TOK_SWITCH_PAGE:
                self.switch_page()
                continue
            else:
                break
            count += 1
        if count == 1 and opaque == 1:
            self.op_single = True
        return opaque

    cdef object text_slow(self, bint allow_bytes):
        cdef Py_ssize_t start = self.pos
        cdef int opaque
        self.tmp_len = 0
        opaque = self.pieces()
        self.op_count = opaque
        if self.buf[self.pos] != TOK_END:
            _raise("element inside a text value", self.pos, "text or END")
        self.pos += 1
        try:
            return PyUnicode_DecodeUTF8(<const char*>self.tmp, self.tmp_len, NULL)
        except UnicodeDecodeError as e:
            if allow_bytes and opaque:
                return PyBytes_FromStringAndSize(<const char*>self.tmp, self.tmp_len)
            _raise("invalid UTF-8", start if not self.op_single else self.op_start + e.start, "UTF-8 text")

    cdef inline object text(self, bint allow_bytes):
        """Content of the element next_tag() just returned, up to and including its END."""
        cdef Py_ssize_t start, n, nxt
        cdef const unsigned char* z
        self.op_single = False
        self.op_count = 0
        if not self.content:
            return EMPTY
        if self.pos < self.end and self.buf[self.pos] == TOK_STR_I:
            start = self.pos + 1
            z = <const unsigned char*>memchr(self.buf + start, 0, self.end - start)
            if z != NULL:
                n = z - (self.buf + start)
                nxt = start + n + 1
                if nxt < self.end and self.buf[nxt] == TOK_END and n <= self.max_string:
                    self.pos = nxt + 1
                    return self.utf8(self.buf + start, n, start)
        return self.text_slow(allow_bytes)

    cdef int flag(self) except -1:
        """An empty element such as Final, MoreData, NoResp."""
        cdef str name
        if self.content:
            name = _tag_name(self.page * 64 + (self.buf[self.tagpos] & 0x3F))
            if self.next_tag() != K_END:
                _raise(f"content in empty element {name}", self.pos, "END")
        return 0

    # --- header --------------------------------------------------------------------------

    cdef int header(self) except -1:
        cdef int version
        cdef Py_ssize_t pub, pub_index = -1, charset, n, pub_pos
        if self.pos >= self.end:
            self.truncated("WBXML version")
        version = self.buf[self.pos]
        if version > 0x03:
            _raise(f"unknown WBXML version 0x{version:02X}", self.pos, "1.0-1.3 (0x00-0x03)")
        self.pos += 1
        pub_pos = self.pos
        pub = self.mbuint()
        if pub == 0:
            pub_index = self.mbuint()
        if version >= 0x01:
            charset = self.mbuint()
            if charset != 106 and charset != 0:
                _raise(f"unsupported charset MIBenum {charset}", self.pos - 1, "UTF-8 (106)")
        n = self.mbuint()
        if n > self.end - self.pos:
            _raise(f"string table length {n} beyond the {self.end - self.pos} bytes left",
                   self.pos, "a length inside the data")
        self.st = self.buf + self.pos
        self.st_len = n
        self.st_pos = self.pos
        self.pos += n
        if pub == 0:
            if pub_index >= self.st_len:
                _raise(f"public id string-table index {pub_index} out of range", pub_pos,
                       "an offset inside the string table")
            n = self.cstr_end(self.st, pub_index, self.st_len, pub_pos, "public id string")
            fpi = _norm_fpi(self.utf8(self.st + pub_index, n, self.st_pos + pub_index))
            if self.lang == LANG_SYNCML:
                pub = _SYNCML_FPIS.get(fpi, -1)
            elif self.lang == LANG_DEVINF:
                pub = _DEVINF_FPIS.get(fpi, -1)
            elif fpi == _DDF_FPI_NORM:
                pub = 1
            else:
                pub = -1
            if pub == -1:
                _raise(f"unknown public id {fpi!r}", pub_pos, self.expected_publicid())
        elif self.lang == LANG_SYNCML:
            if pub != PUBID_SYNCML_1_2 and pub != PUBID_SYNCML_1_1:
                _raise(f"unknown public id 0x{pub:04X}", pub_pos, self.expected_publicid())
        elif self.lang == LANG_DEVINF:
            if (pub != PUBID_DEVINF_1_2 and pub != PUBID_DEVINF_1_1 and pub != PUBID_DEVINF_1_0
                    and pub != PUBID_UNKNOWN):
                _raise(f"unknown public id 0x{pub:04X} for a DevInf document", pub_pos, self.expected_publicid())
        elif pub != PUBID_UNKNOWN:
            _raise(f"unknown public id 0x{pub:04X} for a TNDS document", pub_pos, self.expected_publicid())
        self.publicid = pub
        return 0

    cdef str expected_publicid(self):
        if self.lang == LANG_SYNCML:
            return "SyncML 1.2 (0x1201) or 1.1 (0x0FD3)"
        if self.lang == LANG_DEVINF:
            return "DevInf 1.2 (0x1203), 1.1 (0x0FD4) or 1.0 (0x0FD2)"
        return DDF_FPI

    # --- SyncML structure ---------------------------------------------------------------

    cdef Message document(self):
        cdef Message msg
        cdef int key = self.next_tag()
        if key != S_SyncML or not self.content:
            if key == K_END or key == K_TEXT:
                _raise("expected the SyncML root element", self.pos, "<SyncML>")
            _raise(f"{_tag_name(key)} as root element", self.tagpos, "<SyncML>")
        self.enter()
        msg = Message.__new__(Message)
        key = self.next_tag()
        if key != S_SyncHdr:
            _raise("SyncML without SyncHdr", self.pos if key < 0 else self.tagpos, "<SyncHdr>")
        msg.hdr = self.synchdr()
        key = self.next_tag()
        if key != S_SyncBody:
            _raise("SyncML without SyncBody", self.pos if key < 0 else self.tagpos, "<SyncBody>")
        msg.commands = []
        if self.content:
            self.enter()
            self.body(msg)
            self.depth -= 1
        key = self.next_tag()
        if key != K_END:
            self.unexpected(key, "SyncML")
        self.depth -= 1
        if self.pos != self.end:
            _raise(f"{self.end - self.pos} bytes after the end of the document", self.pos, "end of data")
        return msg

    cdef SyncHdr synchdr(self):
        cdef SyncHdr hdr = SyncHdr.__new__(SyncHdr)
        cdef int key
        if not self.content:
            return hdr
        self.enter()
        while True:
            key = self.next_tag()
            if key == K_END:
                break
            elif key == S_VerDTD:
                hdr.ver_dtd = self.text(False)
            elif key == S_VerProto:
                hdr.ver_proto = self.text(False)
            elif key == S_SessionID:
                hdr.session_id = self.text(False)
            elif key == S_MsgID:
                hdr.msg_id = self.text(False)
            elif key == S_Target:
                self.loc("Target")
                hdr.target = self.loc_uri
                hdr.target_name = self.loc_name
            elif key == S_Source:
                self.loc("Source")
                hdr.source = self.loc_uri
                hdr.source_name = self.loc_name
            elif key == S_RespURI:
                hdr.resp_uri = self.text(False)
            elif key == S_NoResp:
                self.flag()
                hdr.no_resp = True
            elif key == S_Cred:
                hdr.cred = self.cred()
            elif key == S_Meta:
                hdr.meta = self.meta()
            else:
                self.unexpected(key, "SyncHdr")
        self.depth -= 1
        return hdr

    cdef int loc(self, str parent) except -1:
        cdef int key
        self.loc_uri = None
        self.loc_name = None
        if not self.content:
            return 0
        self.enter()
        while True:
            key = self.next_tag()
            if key == K_END:
                break
            elif key == S_LocURI:
                self.loc_uri = self.text(False)
            elif key == S_LocName:
                self.loc_name = self.text(False)
            else:
                self.unexpected(key, parent)
        self.depth -= 1
        return 0

    cdef Cred cred(self):
        cdef Cred cred = Cred.__new__(Cred)
        cdef int key
        if not self.content:
            return cred
        self.enter()
        while True:
            key = self.next_tag()
            if key == K_END:
                break
            elif key == S_Meta:
                cred.meta = self.meta()
            elif key == S_Data:
                cred.data = self.text(True)
            else:
                self.unexpected(key, "Cred")
        self.depth -= 1
        return cred

    cdef Chal chal(self):
        cdef Chal chal = Chal.__new__(Chal)
        cdef int key
        if not self.content:
            return chal
        self.enter()
        while True:
            key = self.next_tag()
            if key == K_END:
                break
            elif key == S_Meta:
                chal.meta = self.meta()
            else:
                self.unexpected(key, "Chal")
        self.depth -= 1
        return chal

    cdef Meta meta(self):
        cdef Meta meta = Meta.__new__(Meta)
        cdef int key
        if not self.content:
            return meta
        self.enter()
        while True:
            key = self.next_tag()
            if key == K_END:
                break
            elif key == M_Format:
                meta.format = self.text(False)
            elif key == M_Type:
                meta.type = self.text(False)
            elif key == M_Size:
                meta.size = self.text(False)
            elif key == M_MaxMsgSize:
                meta.max_msg_size = self.text(False)
            elif key == M_MaxObjSize:
                meta.max_obj_size = self.text(False)
            elif key == M_NextNonce:
                meta.next_nonce = self.text(False)
            elif key == M_Mark:
                meta.mark = self.text(False)
            elif key == M_Version:
                meta.version = self.text(False)
            elif 64 <= key < 128 and M_NAMES[key - 64] is not None:
                if meta.extra is None:
                    meta.extra = []
                meta.extra.append(self.metinf_extra(key))
            else:
                self.unexpected(key, "Meta")
        self.depth -= 1
        return meta

    cdef tuple metinf_extra(self, int key):
        """A MetInf element without a Meta field: (name, text) or (name, [(child, text)])."""
        cdef str name = M_NAMES[key - 64]
        cdef list children
        cdef int k
        if not self.content:
            return (name, EMPTY)
        if self.pos < self.end and self.buf[self.pos] != TOK_SWITCH_PAGE and (self.buf[self.pos] & 0x3F) < 5:
            return (name, self.text(False))
        self.enter()
        children = []
        while True:
            k = self.next_tag()
            if k == K_END:
                break
            if 64 <= k < 128 and M_NAMES[k - 64] is not None:
                children.append((M_NAMES[k - 64], self.text(False)))
            else:
                self.unexpected(k, name)
        self.depth -= 1
        return (name, children)

    cdef int body(self, Message msg) except -1:
        cdef int key
        cdef list commands = msg.commands
        while True:
            key = self.next_tag()
            if key == K_END:
                break
            elif key == S_Final:
                self.flag()
                msg.final = True
            elif (key == S_Status or key == S_Results or key == S_Get or key == S_Replace
                  or key == S_Add or key == S_Alert or key == S_Exec or key == S_Delete
                  or key == S_Copy or key == S_Atomic or key == S_Sequence):
                commands.append(self.command(key))
            else:
                self.unexpected(key, "SyncBody")
        return 0

    cdef Command command(self, int ckey):
        cdef Command cmd = Command.__new__(Command)
        cdef int key
        cdef bint container = ckey == S_Atomic or ckey == S_Sequence
        cmd.name = <str>S_NAMES[ckey]
        if not self.content:
            return cmd
        self.enter()
        while True:
            key = self.next_tag()
            if key == K_END:
                break
            elif key == S_CmdID:
                cmd.cmd_id = self.text(False)
            elif key == S_Item:
                if cmd.items is None:
                    cmd.items = []
                cmd.items.append(self.item(cmd.meta))
            elif key == S_Data:
                cmd.data = self.text(True)
            elif key == S_MsgRef:
                cmd.msg_ref = self.text(False)
            elif key == S_CmdRef:
                cmd.cmd_ref = self.text(False)
            elif key == S_Cmd:
                cmd.cmd = self.text(False)
            elif key == S_TargetRef:
                if cmd.target_refs is None:
                    cmd.target_refs = []
                cmd.target_refs.append(self.text(False))
            elif key == S_SourceRef:
                if cmd.source_refs is None:
                    cmd.source_refs = []
                cmd.source_refs.append(self.text(False))
            elif key == S_Meta:
                if cmd.items is not None:
                    # the command's Meta governs how its Items' Data is read (nested documents)
                    _raise(f"<Meta> after <Item> in <{cmd.name}>", self.tagpos,
                           "Meta before the Items (SyncML DTD order)")
                cmd.meta = self.meta()
            elif key == S_Correlator:
                cmd.correlator = self.text(False)
            elif key == S_NoResp:
                self.flag()
                cmd.no_resp = True
            elif key == S_Cred:
                cmd.cred = self.cred()
            elif key == S_Chal:
                cmd.chal = self.chal()
            elif container and (
                    key == S_Add or key == S_Alert or key == S_Atomic or key == S_Copy
                    or key == S_Delete or key == S_Exec or key == S_Get or key == S_Replace
                    or key == S_Sequence):
                if cmd.commands is None:
                    cmd.commands = []
                cmd.commands.append(self.command(key))
            else:
                self.unexpected(key, cmd.name)
        self.depth -= 1
        return cmd

    cdef Item item(self, Meta cmd_meta):
        cdef Item item = Item.__new__(Item)
        cdef int key
        cdef bint single = False
        cdef Py_ssize_t op_start = 0, op_len = 0
        cdef bytes raw = None
        cdef int lang
        cdef Meta m
        cdef str t
        if not self.content:
            return item
        self.enter()
        while True:
            key = self.next_tag()
            if key == K_END:
                break
            elif key == S_Target:
                self.loc("Target")
                item.target = self.loc_uri
                item.target_name = self.loc_name
            elif key == S_Source:
                self.loc("Source")
                item.source = self.loc_uri
                item.source_name = self.loc_name
            elif key == S_Meta:
                item.meta = self.meta()
            elif key == S_Data:
                item.data = self.text(True)
                single = self.op_single
                op_start = self.op_start
                op_len = self.op_len
                # several pieces, OPAQUE among them: keep their concatenation in case the
                # Meta Type says it is a nested document
                raw = (PyBytes_FromStringAndSize(<const char*>self.tmp, self.tmp_len)
                       if self.op_count and not single else None)
            elif key == S_MoreData:
                self.flag()
                item.more_data = True
            elif key == S_SourceParent:
                self.loc("SourceParent")
                item.source_parent = self.loc_uri
            elif key == S_TargetParent:
                self.loc("TargetParent")
                item.target_parent = self.loc_uri
            else:
                self.unexpected(key, "Item")
        if single or raw is not None:
            # Data with OPAQUE in it, under a Meta Type (the Item's, else the command's) that
            # announces a nested WBXML document: decode it into an Element tree
            m = item.meta if item.meta is not None and item.meta.type is not None else cmd_meta
            if m is not None and m.type is not None:
                t = m.type
                lang = -1
                if t == TNDS_WBXML or t.lower() == TNDS_WBXML:
                    lang = LANG_DDF
                elif t == DEVINF_WBXML or t.lower() == DEVINF_WBXML:
                    lang = LANG_DEVINF
                if lang >= 0:
                    item.data = self.nested(raw, op_start, op_len, lang)
        self.depth -= 1
        return item

    # --- nested TNDS / DevInf document --------------------------------------------------

    cdef Element nested(self, bytes raw, Py_ssize_t start, Py_ssize_t n, int lang):
        """The nested document in buf[start:start+n] (error offsets are the message's), or in
        ``raw``, the concatenated pieces of a Data (error offsets are then within the Data)."""
        cdef _Decoder sub = _Decoder.__new__(_Decoder)
        cdef Element root
        if raw is None:
            sub.data = self.data
            sub.buf = self.buf
            sub.pos = start
            sub.end = start + n
        else:
            sub.data = raw
            sub.buf = <const unsigned char*>PyBytes_AS_STRING(raw)
            sub.pos = 0
            sub.end = PyBytes_GET_SIZE(raw)
        sub.lang = lang
        sub.depth = self.depth
        sub.max_depth = self.max_depth
        sub.max_string = self.max_string
        sub.st_budget = self.st_budget         # one budget for the message and what it nests
        sub.header()
        root = sub.element()
        self.st_budget = sub.st_budget
        if sub.pos != sub.end:
            _raise(f"{sub.end - sub.pos} bytes after the nested document", sub.pos, "end of Data")
        root.xmlns = DDF_NAMESPACE if lang == LANG_DDF else DEVINF_NAMESPACE
        return root

    cdef Element element(self):
        cdef int key = self.next_tag()
        cdef Element el
        cdef unsigned char b
        cdef Py_ssize_t start
        cdef int base = 128 if self.lang == LANG_DDF else 0
        cdef tuple names = D_NAMES if self.lang == LANG_DDF else V_NAMES
        cdef str what = "a DM DDF element" if self.lang == LANG_DDF else "a DevInf element"
        if key < 0:
            _raise(f"expected {what}", self.pos, what)
        if not (base <= key < base + 64) or names[key - base] is None:
            _raise(f"unexpected {_tag_name(key, self.lang)} in a nested document", self.tagpos, what)
        el = Element.__new__(Element)
        el.tag = <str>names[key - base]
        if not self.content:
            return el
        self.enter()
        while True:
            if self.pos >= self.end:
                self.truncated("an element, text or END")
            b = self.buf[self.pos]
            if b == TOK_END:
                self.pos += 1
                break
            if b == TOK_STR_I or b == TOK_STR_T or b == TOK_OPAQUE or b == TOK_ENTITY:
                start = self.pos
                self.tmp_len = 0
                self.pieces()
                t = self.utf8(self.tmp, self.tmp_len, start)
                if t:                       # empty text stays None, as in XML
                    el.text = t if el.text is None else el.text + t
            elif b == TOK_SWITCH_PAGE:
                self.switch_page()
            else:
                if el.children is None:
                    el.children = []
                el.children.append(self.element())
        self.depth -= 1
        return el


def decode(data, *, int max_depth=DEFAULT_MAX_DEPTH, Py_ssize_t max_size=DEFAULT_MAX_SIZE,
           Py_ssize_t max_string=DEFAULT_MAX_STRING, Py_ssize_t max_decoded=-1):
    """Decodes one WBXML SyncML DM message into a Message; CodecError on bad input.

    ``max_decoded``: bytes of text string-table references (STR_T) may copy in all; -1 means
    DEFAULT_DECODED_RATIO times the message's size, at least DEFAULT_MIN_DECODED."""
    cdef _Decoder d
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"decode() needs bytes, not {type(data).__name__}")
        data = bytes(data)
    if PyBytes_GET_SIZE(data) > max_size:
        raise CodecError(f"message of {PyBytes_GET_SIZE(data)} bytes over max_size={max_size}",
                         offset=max_size, expected=f"at most {max_size} bytes")
    d = _Decoder.__new__(_Decoder)
    d.data = data
    d.buf = <const unsigned char*>PyBytes_AS_STRING(data)
    d.pos = 0
    d.end = PyBytes_GET_SIZE(data)
    d.lang = LANG_SYNCML
    d.max_depth = max_depth
    d.max_string = max_string
    if max_decoded < 0:
        max_decoded = max(DEFAULT_DECODED_RATIO * PyBytes_GET_SIZE(data), DEFAULT_MIN_DECODED)
    d.st_budget = max_decoded
    d.header()
    return d.document()


# =========================================================================================
# Encoder
# =========================================================================================

@cython.final
@cython.freelist(4)
cdef class _Encoder:
    cdef unsigned char* buf
    cdef Py_ssize_t len, cap
    cdef int page
    cdef int nesting
    cdef dict strtab        # str -> string-table offset (None: no string table)
    cdef dict counts        # collect pass: str -> occurrences (None: not collecting)
    cdef long next_id       # Message.number_commands: the CmdID for a command without one (0: off)

    def __dealloc__(self):
        if self.buf != NULL:
            free(self.buf)

    cdef int reserve(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t need = self.len + n
        cdef Py_ssize_t cap
        cdef unsigned char* nb
        if need <= self.cap:
            return 0
        cap = self.cap * 2 if self.cap else 1024
        while cap < need:
            cap *= 2
        nb = <unsigned char*>realloc(self.buf, cap)
        if nb == NULL:
            raise MemoryError()
        self.buf = nb
        self.cap = cap
        return 0

    cdef inline int byte(self, unsigned char b) except -1:
        if self.len >= self.cap:
            self.reserve(1)
        self.buf[self.len] = b
        self.len += 1
        return 0

    cdef inline int raw(self, const char* p, Py_ssize_t n) except -1:
        if self.len + n > self.cap:
            self.reserve(n)
        memcpy(self.buf + self.len, p, n)
        self.len += n
        return 0

    cdef int mbuint(self, unsigned long v) except -1:
        cdef unsigned char tmp[5]
        cdef int i = 4
        tmp[4] = v & 0x7F
        v >>= 7
        while v:
            i -= 1
            tmp[i] = 0x80 | (v & 0x7F)
            v >>= 7
        return self.raw(<const char*>tmp + i, 5 - i)

    cdef inline int tag(self, int key, bint content) except -1:
        cdef int page = key >> 6
        if page != self.page:
            self.byte(TOK_SWITCH_PAGE)
            self.byte(page)
            self.page = page
        return self.byte((key & 0x3F) | (0x40 if content else 0))

    cdef inline int end_(self) except -1:
        return self.byte(TOK_END)

    cdef int string(self, str s) except -1:
        """Text content: STR_I, STR_T (string table) or OPAQUE (text holding a NUL)."""
        cdef Py_ssize_t n
        cdef const char* p = PyUnicode_AsUTF8AndSize(s, &n)
        cdef object off
        if memchr(p, 0, n) != NULL:
            self.byte(TOK_OPAQUE)
            self.mbuint(n)
            return self.raw(p, n)
        if self.counts is not None:
            self.counts[s] = self.counts.get(s, 0) + 1
        elif self.strtab is not None:
            off = self.strtab.get(s)
            if off is not None:
                self.byte(TOK_STR_T)
                return self.mbuint(<unsigned long>off)
        if self.len + n + 2 > self.cap:
            self.reserve(n + 2)
        self.buf[self.len] = TOK_STR_I
        memcpy(self.buf + self.len + 1, p, n)
        self.buf[self.len + 1 + n] = 0
        self.len += n + 2
        return 0

    cdef inline int text(self, int key, str s) except -1:
        if s is None:
            return 0
        if not s:
            return self.tag(key, False)
        self.tag(key, True)
        self.string(s)
        return self.byte(TOK_END)

    cdef int opaque(self, const char* p, Py_ssize_t n) except -1:
        self.byte(TOK_OPAQUE)
        self.mbuint(n)
        return self.raw(p, n)

    cdef int data(self, int key, object value) except -1:
        cdef bytes b
        if value is None:
            return 0
        if type(value) is str:
            return self.text(key, <str>value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            b = bytes(value)
            if not b:
                return self.tag(key, False)
            self.tag(key, True)
            self.opaque(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
            return self.end_()
        if isinstance(value, Element):
            if key != S_Item:
                raise CodecError("Element Data outside an Item",
                                 expected="str or bytes (only Item Data carries nested documents)")
            b = _encode_nested(<Element>value)
            key = S_Data
            self.tag(key, True)
            self.opaque(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
            return self.end_()
        if isinstance(value, str):
            return self.text(key, str(value))
        raise CodecError(f"cannot encode Data of type {type(value).__name__}",
                         expected="str, bytes or Element")

    cdef int loc(self, int key, str uri, str name) except -1:
        if uri is None and name is None:
            return 0
        self.tag(key, True)
        self.text(S_LocURI, uri)
        self.text(S_LocName, name)
        return self.end_()

    cdef int meta(self, Meta m, bint tnds) except -1:
        cdef str t
        if m is None:
            return 0
        self.tag(S_Meta, True)
        self.text(M_Format, m.format)
        t = m.type
        if tnds and t is not None:
            if t.lower() == TNDS_XML:
                t = TNDS_WBXML
            elif t.lower() == DEVINF_XML:
                t = DEVINF_WBXML
        self.text(M_Type, t)
        self.text(M_Mark, m.mark)
        self.text(M_Size, m.size)
        self.text(M_Version, m.version)
        self.text(M_NextNonce, m.next_nonce)
        self.text(M_MaxMsgSize, m.max_msg_size)
        self.text(M_MaxObjSize, m.max_obj_size)
        if m.extra:
            self.meta_extra(m.extra)
        return self.end_()

    cdef int meta_extra(self, list extra) except -1:
        for entry in extra:
            try:
                name, value = entry
            except (TypeError, ValueError):
                raise CodecError(f"Meta.extra entry {entry!r} is not a (name, value) pair") from None
            key = M_KEYS.get(name)
            if key is None or name in META_FIELDS:
                raise CodecError(f"Meta.extra name {name!r} is not an extra MetInf element",
                                 expected="a MetInf element without a Meta field")
            if isinstance(value, str):
                self.text(key, value)
            elif isinstance(value, list):
                self.tag(key, True)
                for sub in value:
                    try:
                        sname, svalue = sub
                    except (TypeError, ValueError):
                        raise CodecError(f"Meta.extra child {sub!r} is not a (name, str) pair") from None
                    skey = M_KEYS.get(sname)
                    if skey is None or not isinstance(svalue, str):
                        raise CodecError(f"Meta.extra child {sub!r} is not a MetInf (name, str) pair")
                    self.text(skey, svalue)
                self.end_()
            else:
                raise CodecError(f"Meta.extra value of {name} must be str or list, not {type(value).__name__}")
        return 0

    cdef int cred(self, Cred c) except -1:
        if c is None:
            return 0
        self.tag(S_Cred, True)
        self.meta(c.meta, False)
        self.data(S_Data, c.data)
        return self.end_()

    cdef inline int cmd_id(self, str given) except -1:
        """CmdID under Message.number_commands: the given one or the next number (written
        without a str in between)."""
        cdef char digits[24]
        cdef unsigned char* p
        cdef long v, t
        cdef int n = 1, i
        if given is not None:
            next_cmd_id(&self.next_id, given, digits)     # the numbering goes on after it
            return self.text(S_CmdID, given)
        v = self.next_id
        self.next_id = v + 1
        if self.len + 32 > self.cap:        # page switch, tag, STR_I, digits, NUL, END: one check
            self.reserve(32)
        p = self.buf + self.len
        if self.page != (S_CmdID >> 6):
            p[0] = TOK_SWITCH_PAGE
            p[1] = <unsigned char>(S_CmdID >> 6)
            self.page = S_CmdID >> 6
            p += 2
            self.len += 2
        p[0] = <unsigned char>((S_CmdID & 0x3F) | 0x40)
        p[1] = TOK_STR_I
        if v < 10:                          # (a message holds a few hundred commands at most)
            p[2] = <unsigned char>(48 + v)
        elif v < 100:
            p[2] = <unsigned char>(48 + v // 10)
            p[3] = <unsigned char>(48 + v % 10)
            n = 2
        else:
            t = v
            while t >= 10:
                t //= 10
                n += 1
            for i in range(n + 1, 1, -1):   # the digits, written in place from the last
                p[i] = <unsigned char>(48 + v % 10)
                v //= 10
        p[n + 2] = 0
        p[n + 3] = TOK_END
        self.len += n + 4
        return 0

    cdef int message(self, Message msg) except -1:
        cdef SyncHdr h = msg.hdr
        cdef Command cmd
        self.next_id = 1 if msg.number_commands else 0
        self.tag(S_SyncML, True)
        if h is None:
            h = SyncHdr.__new__(SyncHdr)
        self.tag(S_SyncHdr, True)
        self.text(S_VerDTD, h.ver_dtd)
        self.text(S_VerProto, h.ver_proto)
        self.text(S_SessionID, h.session_id)
        self.text(S_MsgID, h.msg_id)
        self.loc(S_Target, h.target, h.target_name)
        self.loc(S_Source, h.source, h.source_name)
        self.text(S_RespURI, h.resp_uri)
        if h.no_resp:
            self.tag(S_NoResp, False)
        self.cred(h.cred)
        self.meta(h.meta, False)
        self.end_()
        self.tag(S_SyncBody, True)
        if msg.commands:
            for obj in msg.commands:
                self.command(obj)
        if msg.final:
            self.tag(S_Final, False)
        self.end_()
        return self.end_()

    cdef int command(self, object obj) except -1:
        cdef Command cmd
        cdef Item it
        cdef int key
        cdef bint results, tnds = False
        if not isinstance(obj, Command):
            raise CodecError(f"SyncBody entry of type {type(obj).__name__}", expected="Command")
        cmd = <Command>obj
        key = S_COMMAND_KEYS.get(cmd.name, -1)
        if key < 0:
            raise CodecError(f"unknown command name {cmd.name!r}", expected=", ".join(sorted(S_COMMAND_KEYS)))
        self.nesting += 1
        if self.nesting > ENCODE_MAX_NESTING:
            raise CodecError(f"commands nested deeper than {ENCODE_MAX_NESTING}")
        results = key == S_Results
        if cmd.items and cmd.meta is not None:
            for obj in cmd.items:
                if isinstance(obj, Item) and isinstance((<Item>obj).data, Element) and (
                        (<Item>obj).meta is None or (<Item>obj).meta.type is None):
                    tnds = True
        self.tag(key, True)
        if self.next_id > 0:
            self.cmd_id(cmd.cmd_id)
        else:
            self.text(S_CmdID, cmd.cmd_id)
        if cmd.no_resp:
            self.tag(S_NoResp, False)
        self.text(S_MsgRef, cmd.msg_ref)
        self.text(S_CmdRef, cmd.cmd_ref)
        self.text(S_Cmd, cmd.cmd)
        if results:
            self.meta(cmd.meta, tnds)
        if cmd.target_refs:
            for s in cmd.target_refs:
                self.text(S_TargetRef, s)
        if cmd.source_refs:
            for s in cmd.source_refs:
                self.text(S_SourceRef, s)
        self.cred(cmd.cred)
        if cmd.chal is not None:
            self.tag(S_Chal, True)
            self.meta(cmd.chal.meta, False)
            self.end_()
        if not results:
            self.meta(cmd.meta, tnds)
        self.data(S_Data, cmd.data)
        self.text(S_Correlator, cmd.correlator)
        if cmd.items:
            for obj in cmd.items:
                if not isinstance(obj, Item):
                    raise CodecError(f"{cmd.name} item of type {type(obj).__name__}", expected="Item")
                self.item(<Item>obj, cmd.meta)
        if cmd.commands:
            if key != S_Atomic and key != S_Sequence:
                raise CodecError(f"{cmd.name} cannot hold commands", expected="Atomic or Sequence")
            for obj in cmd.commands:
                if isinstance(obj, Command) and (<Command>obj).name in ("Status", "Results"):
                    raise CodecError(f"{(<Command>obj).name} inside {cmd.name}",
                                     expected="Add, Alert, Atomic, Copy, Delete, Exec, Get, Replace, Sequence")
                self.command(obj)
        self.nesting -= 1
        return self.end_()

    cdef int item(self, Item it, Meta cmd_meta) except -1:
        cdef bint tree = isinstance(it.data, Element)
        cdef str t
        if tree:
            # the decoder turns OPAQUE into a tree only under a Meta Type that says so
            m = it.meta if it.meta is not None and it.meta.type is not None else cmd_meta
            t = m.type.lower() if m is not None and m.type is not None else None
            ns = (<Element>it.data).xmlns
            if ns == DDF_NAMESPACE:
                ok = t == TNDS_XML or t == TNDS_WBXML
            else:
                ok = (ns == DEVINF_NAMESPACE) and (t == DEVINF_XML or t == DEVINF_WBXML)
            if ns != DDF_NAMESPACE and ns != DEVINF_NAMESPACE:
                raise CodecError(f"Element Data whose root has namespace {ns!r}",
                                 expected=f"root xmlns {DDF_NAMESPACE} (TNDS) or {DEVINF_NAMESPACE} (DevInf)")
            if not ok:
                raise CodecError(f"Element Data (namespace {ns!r}) under Meta Type {t!r}",
                                 expected=f"Type {TNDS_XML} / {TNDS_WBXML} for a TNDS tree, "
                                          f"{DEVINF_XML} / {DEVINF_WBXML} for DevInf")
        self.tag(S_Item, True)
        self.loc(S_Target, it.target, it.target_name)
        self.loc(S_Source, it.source, it.source_name)
        self.loc(S_SourceParent, it.source_parent, None)
        self.loc(S_TargetParent, it.target_parent, None)
        self.meta(it.meta, tree)
        self.data(S_Item if tree else S_Data, it.data)
        if it.more_data:
            self.tag(S_MoreData, False)
        return self.end_()

    cdef int element(self, Element el, dict keys, str ns, bint root=False) except -1:
        if el.xmlns is not None and not root:
            # the model keeps xmlns on the root only; a child's own namespace cannot travel
            raise CodecError(f"element {el.tag!r} in namespace {el.xmlns!r} inside a {ns} document",
                             expected="xmlns None below the root (one namespace per nested document)")
        key = keys.get(el.tag)
        if key is None:
            if keys is D_KEYS:
                raise CodecError(f"element {el.tag!r} is not in the DM DDF code page", expected="a DM DDF element")
            raise CodecError(f"element {el.tag!r} is not in the DevInf code page", expected="a DevInf element")
        self.nesting += 1
        if self.nesting > ENCODE_MAX_NESTING:
            raise CodecError(f"Element tree deeper than {ENCODE_MAX_NESTING}")
        if el.text is None and not el.children:
            self.tag(key, False)
        else:
            self.tag(key, True)
            if el.text:
                self.string(el.text)
            if el.children:
                for child in el.children:
                    if not isinstance(child, Element):
                        raise CodecError(f"Element child of type {type(child).__name__}", expected="Element")
                    self.element(<Element>child, keys, ns)
            self.end_()
        self.nesting -= 1
        return 0

    cdef bytes document(self, int version, object public_id, list table):
        """Header (version, public id, UTF-8, string table) + the body already in buf."""
        cdef _Encoder h = _Encoder.__new__(_Encoder)
        cdef Py_ssize_t n
        cdef const char* p
        cdef bytes st
        h.byte(version)
        if isinstance(public_id, str):
            h.byte(0)
            h.mbuint(0)          # the FPI is the first string-table entry
        else:
            h.mbuint(<unsigned long>public_id)
        if version >= 1:
            h.byte(106)          # UTF-8
        st = b"".join(table) if table else b""
        h.mbuint(len(st))
        h.raw(PyBytes_AS_STRING(st), len(st))
        out = PyBytes_FromStringAndSize(NULL, h.len + self.len)
        p = PyBytes_AS_STRING(out)
        memcpy(<char*>p, h.buf, h.len)
        memcpy(<char*>p + h.len, self.buf, self.len)
        return out


cdef list _string_table(_Encoder enc, object public_id):
    """Builds the string table from the strings a collect pass counted: every string used
    twice or more (and longer than 2 bytes) gets an entry.  Returns the table pieces."""
    cdef list pieces = []
    cdef Py_ssize_t off = 0
    cdef bytes b
    enc.strtab = {}
    if isinstance(public_id, str):
        b = (<str>public_id).encode() + b"\0"
        pieces.append(b)
        off = len(b)
    if enc.counts:
        for s, c in enc.counts.items():
            if c >= 2:
                b = (<str>s).encode()
                if len(b) > 2:
                    enc.strtab[s] = off
                    pieces.append(b + b"\0")
                    off += len(b) + 1
    enc.counts = None
    return pieces


cdef bytes _encode_nested(Element root):
    """A nested document as libwbxml writes it: TNDS with the literal DM DDF FPI and its tags
    on code page 2; DevInf 1.2 with public id 0x1203 and its tags on code page 0."""
    cdef _Encoder enc = _Encoder.__new__(_Encoder)
    if root.xmlns == DDF_NAMESPACE:
        enc.element(root, D_KEYS, DDF_NAMESPACE, True)
        return enc.document(0x03, DDF_FPI, [DDF_FPI.encode() + b"\0"])
    if root.xmlns == DEVINF_NAMESPACE:
        enc.element(root, V_KEYS, DEVINF_NAMESPACE, True)
        return enc.document(0x03, PUBID_DEVINF_1_2, None)
    raise CodecError(f"cannot encode a nested document in namespace {root.xmlns!r}",
                     expected=f"{DDF_NAMESPACE} or {DEVINF_NAMESPACE}")


def encode(msg, *, bint string_table=False, int version=0x03, public_id=PUBID_SYNCML_1_2):
    """Encodes a Message as WBXML (1.3, public id 0x1201, UTF-8 by default).

    ``string_table=True`` puts repeated strings in the string table; ``public_id`` is a
    numeric id or a literal FPI string (written through the string table).
    """
    cdef _Encoder enc
    cdef list table = None
    if not isinstance(msg, Message):
        raise CodecError(f"cannot encode {type(msg).__name__}", expected="Message")
    if not 0 <= version <= 3:
        raise CodecError(f"unsupported WBXML version 0x{version:02X}", expected="0x00-0x03")
    if isinstance(public_id, str):
        if _norm_fpi(public_id) not in _SYNCML_FPIS:
            raise CodecError(f"unsupported public id {public_id!r}", expected="a SyncML 1.1/1.2 FPI")
    elif public_id not in (PUBID_SYNCML_1_2, PUBID_SYNCML_1_1):
        raise CodecError(f"unsupported public id {public_id!r}", expected="0x1201 or 0x0FD3")
    enc = _Encoder.__new__(_Encoder)
    try:
        if string_table:
            enc.counts = {}
            enc.message(<Message>msg)
            table = _string_table(enc, public_id)
            enc.len = 0
            enc.page = 0
        elif isinstance(public_id, str):
            table = [(<str>public_id).encode() + b"\0"]
        enc.message(<Message>msg)
    except TypeError as e:           # e.g. a non-str in target_refs or Element.text
        raise CodecError(f"cannot encode the message: {e}") from e
    return enc.document(version, public_id, table)
