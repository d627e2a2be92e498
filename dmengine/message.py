"""The SyncML DM message model both codecs produce and the session engine reads (L0).

The classes are Cython cdef classes (``_message.pyx``) so that the codecs and the session
build and read them at C speed; Python sees plain keyword-constructed objects::

    Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1A2B", msg_id="1",
                        target="IMEI:356938035643809", source="https://dm.example.com/dm"),
            commands=[Command(name="Get", cmd_id="1", items=[Item(target="./DevInfo/Mod")])],
            final=True)
"""
from ._message import Chal, Command, Cred, Element, Item, Message, Meta, SyncHdr

__all__ = ["Chal", "Command", "Cred", "Element", "Item", "Message", "Meta", "SyncHdr",
           "COMMAND_NAMES", "CONTAINER_NAMES"]

# SyncBody children a DM peer may send (PROTOCOL.md §3.2).
COMMAND_NAMES = frozenset({
    "Add", "Alert", "Atomic", "Copy", "Delete", "Exec", "Get", "Replace", "Sequence",
    "Status", "Results",
})
CONTAINER_NAMES = frozenset({"Atomic", "Sequence"})
