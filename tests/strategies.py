"""Hypothesis strategies for random, VALID SyncML DM messages (shared by both codecs' tests).

The messages follow the model conventions of ``dmengine/_message.pxd``: absent is ``None``,
lists are never empty, text is any str XML 1.0 can carry (no C0 controls other than TAB, LF,
CR; no U+FFFE/U+FFFF; no lone surrogates), ``""`` is a legal (present but empty) value.

* ``messages(binary=False)`` -- what both codecs must round-trip.  ``binary=True`` adds
  ``bytes`` Data / Cred Data that is never valid UTF-8 (WBXML only: XML cannot carry it).
* Element Data (a TNDS tree of DM DDF element names, root ``xmlns="syncml:dmddf1.2"``) sits in
  an Item whose own Meta Type is ``tnds_type`` (default the WBXML TNDS type, which the WBXML
  decoder needs to decode the nested document; the XML codec does not look at it).
* Atomic / Sequence hold management commands only (never Status / Results), nested up to
  ``max_nesting`` deep.
"""
from __future__ import annotations

from hypothesis import strategies as st

from dmengine._tokens import PAGES
from dmengine.message import Chal, Command, Cred, Element, Item, Message, Meta, SyncHdr

__all__ = ["xml_text", "metas", "elements", "items", "commands", "headers", "messages",
           "TNDS_WBXML", "TNDS_XML", "DDF_NAMESPACE"]

TNDS_WBXML = "application/vnd.syncml.dmtnds+wbxml"
TNDS_XML = "application/vnd.syncml.dmtnds+xml"
DDF_NAMESPACE = "syncml:dmddf1.2"

# C0 controls other than TAB/LF/CR and the two non-characters XML 1.0 excludes
_NOT_XML = "".join(chr(c) for c in range(32) if c not in (9, 10, 13)) + "\ufffe\uffff"
_DDF_TAGS = sorted(PAGES["dmddf"][2][1].values())
_EXTRA_LEAVES = ["EMI", "FreeID", "FreeMem", "Last", "Next", "SharedMem", "FieldLevel"]
_EXTRA_GROUPS = ["Anchor", "Mem", "MetInf"]
_GROUP_CHILDREN = ["Last", "Next", "FreeMem", "FreeID", "SharedMem", "EMI", "Format", "Type"]
_SIMPLE = ["Add", "Alert", "Copy", "Delete", "Exec", "Get", "Replace", "Status", "Results"]
_IN_CONTAINER = ["Add", "Alert", "Copy", "Delete", "Exec", "Get", "Replace"]


def xml_text(min_size: int = 0, max_size: int = 20) -> st.SearchStrategy[str]:
    """Any text XML 1.0 can carry (including whitespace, markup characters, CR, astral chars)."""
    chars = st.characters(exclude_categories=["Cs"], exclude_characters=_NOT_XML)
    return st.text(chars, min_size=min_size, max_size=max_size)


def _opt(s: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | s


def _binary() -> st.SearchStrategy[bytes]:
    return st.binary(max_size=20).map(lambda b: b"\xff" + b)      # never valid UTF-8


def metas() -> st.SearchStrategy[Meta]:
    t = xml_text()
    extra_entry = (st.tuples(st.sampled_from(_EXTRA_LEAVES), t)
                   | st.tuples(st.sampled_from(_EXTRA_GROUPS),
                               st.lists(st.tuples(st.sampled_from(_GROUP_CHILDREN), t),
                                        min_size=1, max_size=3)))
    return st.builds(Meta, format=_opt(t), type=_opt(t), mark=_opt(t), size=_opt(t),
                     max_msg_size=_opt(t), max_obj_size=_opt(t), next_nonce=_opt(t),
                     version=_opt(t), extra=_opt(st.lists(extra_entry, min_size=1, max_size=3)))


def elements() -> st.SearchStrategy[Element]:
    """A TNDS-like tree: leaves carry non-empty text or none, interior nodes only children."""
    leaf = st.builds(Element, tag=st.sampled_from(_DDF_TAGS), text=_opt(xml_text(min_size=1)))
    tree = st.recursive(leaf, lambda kids: st.builds(
        Element, tag=st.sampled_from(_DDF_TAGS), children=st.lists(kids, min_size=1, max_size=3)),
        max_leaves=6)

    def rooted(el: Element) -> Element:
        el.xmlns = DDF_NAMESPACE
        return el
    return tree.map(rooted)


def items(*, binary: bool = False, tnds_type: str = TNDS_WBXML) -> st.SearchStrategy[Item]:
    t = xml_text()
    data: st.SearchStrategy[str | bytes | None] = st.one_of(st.none(), t, _binary()) if binary \
        else st.one_of(st.none(), t)
    plain = st.builds(Item, target=_opt(t), target_name=_opt(t), source=_opt(t),
                      source_name=_opt(t), target_parent=_opt(t), source_parent=_opt(t),
                      meta=_opt(metas()), data=data, more_data=st.booleans())
    tnds = st.builds(Item, target=_opt(t), source=_opt(t),
                     meta=st.builds(Meta, type=st.just(tnds_type), format=st.just("xml")),
                     data=elements())
    return plain | tnds


def _command(names: list[str], binary: bool, tnds_type: str) -> st.SearchStrategy[Command]:
    t = xml_text()
    data: st.SearchStrategy[str | bytes | None] = st.one_of(st.none(), t, _binary()) if binary \
        else st.one_of(st.none(), t)
    refs = _opt(st.lists(t, min_size=1, max_size=3))
    return st.builds(
        Command, name=st.sampled_from(names), cmd_id=_opt(t), no_resp=st.booleans(),
        msg_ref=_opt(t), cmd_ref=_opt(t), cmd=_opt(t), target_refs=refs, source_refs=refs,
        cred=_opt(st.builds(Cred, meta=_opt(metas()), data=data)),
        chal=_opt(st.builds(Chal, meta=_opt(metas()))), meta=_opt(metas()), data=data,
        correlator=_opt(t),
        items=_opt(st.lists(items(binary=binary, tnds_type=tnds_type), min_size=1, max_size=3)))


def commands(*, binary: bool = False, tnds_type: str = TNDS_WBXML,
             max_nesting: int = 3) -> st.SearchStrategy[Command]:
    """A SyncBody command: a simple one, or Atomic / Sequence around management commands."""
    inner: st.SearchStrategy[Command] = _command(_IN_CONTAINER, binary, tnds_type)
    for _ in range(max_nesting):
        inner = inner | st.builds(
            Command, name=st.sampled_from(["Atomic", "Sequence"]), cmd_id=_opt(xml_text()),
            no_resp=st.booleans(), meta=_opt(metas()),
            commands=_opt(st.lists(inner, min_size=1, max_size=3)))
    return _command(_SIMPLE, binary, tnds_type) | inner


def headers(*, binary: bool = False) -> st.SearchStrategy[SyncHdr]:
    t = xml_text()
    data: st.SearchStrategy[str | bytes | None] = st.one_of(st.none(), t, _binary()) if binary \
        else st.one_of(st.none(), t)
    return st.builds(SyncHdr, ver_dtd=_opt(t), ver_proto=_opt(t), session_id=_opt(t),
                     msg_id=_opt(t), target=_opt(t), target_name=_opt(t), source=_opt(t),
                     source_name=_opt(t), resp_uri=_opt(t), no_resp=st.booleans(),
                     cred=_opt(st.builds(Cred, meta=_opt(metas()), data=data)),
                     meta=_opt(metas()))


def messages(*, binary: bool = False, tnds_type: str = TNDS_WBXML,
             max_commands: int = 4) -> st.SearchStrategy[Message]:
    """Random valid Messages.  ``binary=True`` only for WBXML (XML cannot carry non-UTF-8)."""
    return st.builds(Message, hdr=headers(binary=binary),
                     commands=st.lists(commands(binary=binary, tnds_type=tnds_type),
                                       max_size=max_commands),
                     final=st.booleans())
