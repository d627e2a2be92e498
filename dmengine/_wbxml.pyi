"""Stubs for the WBXML codec (dmengine/_wbxml.pyx)."""
from __future__ import annotations

from dmengine._message import Message

DEFAULT_MAX_DEPTH: int
"""Element nesting limit of decode() (SyncML counts as 1)."""
DEFAULT_MAX_SIZE: int
"""Largest message decode() accepts, in bytes."""
DEFAULT_MAX_STRING: int
"""Largest single text value / Data decode() accepts, in bytes (after concatenating pieces)."""
DEFAULT_DECODED_RATIO: int
"""decode()'s default budget of string-table text: this many times the message's size ..."""
DEFAULT_MIN_DECODED: int
"""... and at least this many bytes."""
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
    max_decoded: int = ...,   # bytes STR_T references may copy; default 8x the message, >= 64 KiB
) -> Message:
    """Decodes one WBXML SyncML DM message; raises dmengine.errors.CodecError on bad input.

    Limits: ``max_depth`` element nesting (SyncML = 1, nested documents included),
    ``max_size`` bytes of input, ``max_string`` bytes of one text value after its pieces
    are concatenated.
    """

def encode(
    msg: Message,
    *,
    string_table: bool = False,
    version: int = 0x03,
    public_id: int | str = 0x1201,
) -> bytes:
    """Encodes a Message as WBXML (default: 1.3, public id 0x1201, UTF-8, no string table).

    ``public_id`` is 0x1201 / 0x0FD3 or a SyncML 1.1/1.2 FPI (written through the string
    table); ``string_table=True`` moves strings used twice or more into the string table.
    Element Data is allowed only in an Item, with its root's xmlns ``syncml:dmddf1.2`` (TNDS)
    or ``syncml:devinf`` (DevInf), children without xmlns, and a matching Meta Type in force
    (+xml or +wbxml; +xml is written as +wbxml).  Raises dmengine.errors.CodecError for a
    model it cannot encode.
    """
