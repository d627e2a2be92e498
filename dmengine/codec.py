"""Picks the codec of a SyncML DM HTTP body by its content type (L1).

Media types (PROTOCOL.md §11): ``application/vnd.syncml.dm+xml`` and
``application/vnd.syncml.dm+wbxml``, and -- tolerated on input, field practice -- the SyncML DS
types ``application/vnd.syncml+xml`` / ``application/vnd.syncml+wbxml``.  A ``charset``
parameter is accepted when it names UTF-8 (quoted or not, any case); any other charset, and any
other media type, raises ``UnsupportedContentType`` (a ``CodecError``; answer HTTP 415).

The codec returned for a request is also the one to answer with: its ``content_type`` is the
request's media type, so a peer that speaks the DS type hears it back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import _wbxml, xmlcodec
from ._message import Message
from .errors import UnsupportedContentType

__all__ = ["Codec", "XML", "WBXML", "CONTENT_TYPES", "codec_for"]


@dataclass(frozen=True, slots=True)
class Codec:
    """One wire encoding: ``decode(bytes, max_depth=, max_size=) -> Message``, ``encode``."""

    name: str                       # "xml" | "wbxml"
    content_type: str               # media type to answer with (no parameters)
    decode: Callable[..., Message]
    encode: Callable[[Message], bytes]

    @property
    def is_xml(self) -> bool:
        return self.name == "xml"


XML = Codec("xml", "application/vnd.syncml.dm+xml", xmlcodec.decode, xmlcodec.encode)
WBXML = Codec("wbxml", "application/vnd.syncml.dm+wbxml", _wbxml.decode, _wbxml.encode)
_DS_XML = Codec("xml", "application/vnd.syncml+xml", xmlcodec.decode, xmlcodec.encode)
_DS_WBXML = Codec("wbxml", "application/vnd.syncml+wbxml", _wbxml.decode, _wbxml.encode)

#: media type (lower case) -> codec
CONTENT_TYPES: dict[str, Codec] = {c.content_type: c for c in (XML, WBXML, _DS_XML, _DS_WBXML)}

_UTF8 = frozenset({"utf-8", "utf8"})


def codec_for(content_type: str | None) -> Codec:
    """The codec for an HTTP ``Content-Type`` value such as
    ``application/vnd.syncml.dm+xml; charset="utf-8"``."""
    if not content_type:
        raise UnsupportedContentType("no content type", content_type=content_type,
                                     what="media type", expected=_expected())
    media, _, params = content_type.partition(";")
    codec = CONTENT_TYPES.get(media.strip().lower())
    if codec is None:
        raise UnsupportedContentType(f"unsupported media type {media.strip()!r}",
                                     content_type=content_type, what="media type",
                                     expected=_expected())
    for param in params.split(";"):
        key, eq, value = param.partition("=")
        if not eq:
            if param.strip():
                raise UnsupportedContentType(f"malformed content type parameter {param.strip()!r}",
                                             content_type=content_type, what="media type",
                                             expected="name=value")
            continue
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').strip("'").strip().lower()
            if charset not in _UTF8:
                raise UnsupportedContentType(
                    f"unsupported charset {charset!r}: SyncML DM bodies must be UTF-8",
                    content_type=content_type, what="charset", expected="charset=utf-8")
    return codec


def _expected() -> str:
    return " or ".join(CONTENT_TYPES)
