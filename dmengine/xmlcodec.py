"""SyncML DM over XML (``application/vnd.syncml.dm+xml``), L1: bytes <-> ``Message``.

``decode(data)`` and ``encode(msg)`` are thin wrappers over the Cython core ``_xml``, a
single-pass scanner that builds the message model directly (no intermediate tree).

What decode accepts
    * UTF-8 only: an optional BOM, an optional ``<?xml version="1.0" encoding="UTF-8"?>``;
      any other declared encoding, UTF-16 or invalid UTF-8 is a ``CodecError``.
    * An optional DOCTYPE without internal subset (``<!DOCTYPE SyncML PUBLIC "..." "...">``).
      A DOCTYPE with an internal subset -- entity declarations, entity bombs -- is refused
      outright.  References: the five predefined entities and ``&#NN;`` / ``&#xHH;`` only.
    * Namespaces as clients send them: ``SyncML`` in ``SYNCML:SYNCML1.2`` (or 1.1, 1.0,
      compared case-insensitively) or in no namespace; MetInf elements in ``syncml:metinf``
      by default declaration or prefix (``xmlns:mi="syncml:metinf"`` ... ``<mi:Type>``), and
      liberally also unqualified inside ``Meta`` (the names do not collide).  Other
      attributes are ignored.
    * Comments and processing instructions are skipped; CDATA is text.
    * Whitespace-only text between elements is ignored.  Leaf text is kept exactly as sent
      (after XML's CR/LF normalisation and reference expansion): it is *not* stripped, so
      ``<Data> 1 </Data>`` is ``" 1 "``.  An empty leaf (``<Data/>``) is ``""``; an absent
      one is ``None``.
    * Elements may come in any order; a repeated single-valued element is an error.
    * Data of an Item that holds an element (an inline TNDS ``<MgmtTree
      xmlns="syncml:dmddf1.2">``) becomes an ``Element`` tree: ``xmlns`` is set on an element
      whose namespace differs from its parent's (so on the nested root), text of an element
      with children is dropped when it is whitespace only, empty text is ``None``.
    * SyncBody commands of the SyncML DTD that DM does not use (Sync, Map, Put, Search, Move)
      decode to a ``Command`` with only ``name`` and ``cmd_id`` (their content is checked for
      well-formedness and skipped) so the session can answer them.  Lang, Archive, SftDel and
      NoResults are accepted and dropped.  Any other unknown element is an error.
    * MetInf elements without a Meta field go to ``Meta.extra``: ``(name, str)``, or for the
      groups Anchor, Mem and the MetInf wrapper ``(name, [(child, str), ...])``.
    * Limits: ``max_size`` bytes (checked first), ``max_depth`` nested elements.

What encode writes
    Compact UTF-8 XML with an XML declaration, ``<SyncML xmlns="SYNCML:SYNCML1.2">`` (1.1
    when VerDTD is 1.1), elements in SyncML DTD order, every MetInf element with its own
    ``xmlns="syncml:metinf"`` (as OMA examples and libwbxml's xml2wbxml expect), ``&``, ``<``,
    ``>`` escaped and CR as ``&#13;``.  Characters XML 1.0 cannot carry raise ``CodecError``.
    ``bytes`` Data becomes a CDATA section when it is UTF-8 (it then decodes as ``str``);
    binary Data that is not UTF-8 raises ``CodecError`` -- send it with Format ``b64``.

Every error is a ``dmengine.errors.CodecError`` carrying ``offset`` (decode) and
``expected``.
"""
from __future__ import annotations

from . import _xml
from ._message import Message
from .errors import CodecError

__all__ = ["CONTENT_TYPE", "DEFAULT_MAX_DEPTH", "DEFAULT_MAX_SIZE", "decode", "encode"]

CONTENT_TYPE = "application/vnd.syncml.dm+xml"
DEFAULT_MAX_DEPTH: int = _xml.DEFAULT_MAX_DEPTH
DEFAULT_MAX_SIZE: int = _xml.DEFAULT_MAX_SIZE


def decode(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH,
           max_size: int = DEFAULT_MAX_SIZE) -> Message:
    """Decodes one SyncML DM message in XML; raises ``CodecError`` on bad input."""
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodecError(f"cannot decode {type(data).__name__}", offset=0, expected="bytes")
        data = bytes(data)
    if max_depth < 1 or max_size < 0:
        raise ValueError("max_depth must be >= 1 and max_size >= 0")
    return _xml.decode(data, max_depth=max_depth, max_size=max_size)


def encode(msg: Message) -> bytes:
    """Encodes a ``Message`` as compact UTF-8 XML; raises ``CodecError`` if XML cannot carry it."""
    if not isinstance(msg, Message):
        raise CodecError(f"cannot encode {type(msg).__name__}", expected="Message")
    try:
        return _xml.encode(msg)
    except (TypeError, RecursionError) as exc:  # a field of the wrong type, a cyclic model
        raise CodecError(f"cannot encode message: {exc}", expected="a valid Message") from None
