# The SyncML DM message model (L0), as cdef classes so that the Cython codecs and the
# session engine build and read it at C speed.  Python code sees plain attributes.
#
# Conventions (both codecs follow them, so XML and WBXML of one message give equal models):
# * text values are str exactly as sent (no int conversion: "1", "200", "10000");
# * an element that is absent is None; a list whose elements are all absent is None
#   (never an empty list), so equality is plain field equality;
# * Data holds str, or bytes (OPAQUE that is not UTF-8), or an Element tree (a nested
#   document such as TNDS, decoded when Meta Type says so).

cdef class Element:
    cdef public str tag
    cdef public str xmlns          # namespace of a nested document's root, else None
    cdef public str text
    cdef public list children      # list[Element] | None
    cpdef tuple astuple(self)

cdef class Meta:
    cdef public str format
    cdef public str type
    cdef public str mark
    cdef public str size
    cdef public str max_msg_size
    cdef public str max_obj_size
    cdef public str next_nonce
    cdef public str version
    cdef public list extra         # other MetInf elements: [(name, str | list[(name, str)])] | None
    cpdef tuple astuple(self)

cdef class Cred:
    cdef public Meta meta
    cdef public object data        # str | bytes | None
    cpdef tuple astuple(self)

cdef class Chal:
    cdef public Meta meta
    cpdef tuple astuple(self)

cdef class Item:
    cdef public str target
    cdef public str target_name
    cdef public str source
    cdef public str source_name
    cdef public str target_parent
    cdef public str source_parent
    cdef public Meta meta
    cdef public object data        # str | bytes | Element | None
    cdef public bint more_data
    cpdef tuple astuple(self)

cdef class Command:
    cdef public str name           # element name: "Get", "Status", "Atomic", ...
    cdef public str cmd_id
    cdef public bint no_resp
    cdef public str msg_ref        # Status / Results
    cdef public str cmd_ref        # Status / Results
    cdef public str cmd            # Status: the command name it answers
    cdef public list target_refs   # Status / Results: list[str] | None
    cdef public list source_refs   # Status / Results: list[str] | None
    cdef public Cred cred
    cdef public Chal chal          # Status
    cdef public Meta meta
    cdef public object data        # Alert code / Status code (str)
    cdef public str correlator     # Alert / Exec
    cdef public list items         # list[Item] | None
    cdef public list commands      # Atomic / Sequence children: list[Command] | None
    cpdef tuple astuple(self)

cdef class SyncHdr:
    cdef public str ver_dtd
    cdef public str ver_proto
    cdef public str session_id
    cdef public str msg_id
    cdef public str target
    cdef public str target_name
    cdef public str source
    cdef public str source_name
    cdef public str resp_uri
    cdef public bint no_resp
    cdef public Cred cred
    cdef public Meta meta
    cpdef tuple astuple(self)

cdef class Message:
    cdef public SyncHdr hdr
    cdef public list commands      # list[Command], SyncBody children in order
    cdef public bint final
    # Not content (outside _fields, equality and pickling): an instruction to the encoders.
    # True: a command without CmdID gets the number after the previous command's (depth
    # first; the first gets 1).  The session engine sends one shared Command object to many
    # devices this way instead of a numbered copy per session.
    cdef public bint number_commands

    cpdef tuple astuple(self)
