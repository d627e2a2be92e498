"""Stubs for the XML codec core (dmengine/_xml.pyx); use dmengine.xmlcodec."""
from __future__ import annotations

from dmengine._message import Message

DEFAULT_MAX_DEPTH: int
"""Element nesting limit of decode() (SyncML counts as 1)."""
DEFAULT_MAX_SIZE: int
"""Largest message decode() accepts, in bytes."""
NS_SYNCML: str
"""Namespace written on the root (SyncML 1.2); SYNCML:SYNCML1.1 when VerDTD is 1.1."""
NS_SYNCML11: str
NS_METINF: str
"""Namespace written on every MetInf element."""
COMMANDS: frozenset[str]
"""SyncBody commands the model carries in full."""
OTHER_COMMANDS: frozenset[str]
"""SyncBody commands of the SyncML DTD DM does not use: decoded to name + CmdID only."""
METINF_EXTRA: frozenset[str]
"""MetInf elements without a Meta field, carried in Meta.extra as (name, str)."""
METINF_GROUPS: frozenset[str]
"""MetInf elements carried in Meta.extra as (name, [(child, str), ...])."""

def decode(data: bytes, *, max_depth: int = ..., max_size: int = ...) -> Message:
    """Decodes one SyncML DM message in XML; raises dmengine.errors.CodecError on bad input."""

def encode(msg: Message) -> bytes:
    """Encodes a Message as compact UTF-8 XML; raises dmengine.errors.CodecError if XML cannot carry it."""

MAX_DEPTH_CAP: int
"""Largest max_depth decode() takes (the decoder recurses once per level)."""
ENCODE_MAX_NESTING: int
"""Deepest command / Element nesting encode() follows (guards against cyclic models)."""
