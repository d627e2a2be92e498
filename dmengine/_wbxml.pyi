"""Stubs for the WBXML codec (dmengine/_wbxml.pyx)."""
from __future__ import annotations

from dmengine._message import Message

DEFAULT_MAX_DEPTH: int
"""Element nesting limit of decode() (SyncML counts as 1)."""
DEFAULT_MAX_SIZE: int
"""Largest message decode() accepts, in bytes."""
DEFAULT_MAX_STRING: int
"""Largest single text value / Data decode() accepts, in bytes (after concatenating pieces)."""
ENCODE_MAX_NESTING: int
"""Deepest command / Element nesting encode() follows (guards against cyclic models)."""
TNDS_WBXML: str
"""Meta Type of Data holding a nested WBXML TNDS document (decoded into an Element tree)."""
TNDS_XML: str
DEVINF_WBXML: str
"""Meta Type of Data holding a nested WBXML DevInf document (decoded into an Element tree)."""
DEVINF_XML: str
DDF_NAMESPACE: str
DDF_FPI: str
DEVINF_NAMESPACE: str

def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_depth: int = ...,
    max_size: int = ...,
    max_string: int = ...,
) -> Message:
    """Decodes one WBXML SyncML DM message; raises dmengine.errors.CodecError on bad input."""

def encode(
    msg: Message,
    *,
    string_table: bool = False,
    version: int = 0x03,
    public_id: int | str = 0x1201,
) -> bytes:
    """Encodes a Message as WBXML; raises dmengine.errors.CodecError for a model it cannot encode."""
