"""Cross-codec properties: XML and WBXML of the same message give equal models; codec_for."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings

import strategies
from conftest import BENCH_MESSAGES, VECTORS, shared_files
from dmengine import _wbxml, codec, xmlcodec
from dmengine.errors import CodecError, UnsupportedContentType
from dmengine.message import Command, Element, Item, Message, Meta, SyncHdr

PAIRS = sorted((p, p.with_suffix(".wbxml")) for p in shared_files(VECTORS, "*.xml") + shared_files(BENCH_MESSAGES, "*.xml")
               if not p.name.startswith("bad-"))
XML2WBXML = shutil.which("xml2wbxml") or "/usr/bin/xml2wbxml"
WBXML2XML = shutil.which("wbxml2xml") or "/usr/bin/wbxml2xml"


def test_every_xml_vector_has_its_wbxml():
    assert len(PAIRS) == 15 and all(w.exists() for _, w in PAIRS)


@pytest.mark.parametrize("xml,wbxml", PAIRS, ids=lambda p: p.name)
def test_xml_and_wbxml_of_each_vector_decode_to_equal_models(xml, wbxml):
    from_xml = xmlcodec.decode(xml.read_bytes())
    assert _wbxml.decode(wbxml.read_bytes()) == from_xml
    # and each codec re-encodes the model so that the other one reads it back
    assert xmlcodec.decode(xmlcodec.encode(_wbxml.decode(wbxml.read_bytes()))) == from_xml
    assert _wbxml.decode(_wbxml.encode(from_xml)) == from_xml


def test_wbxml_variants_of_vector_01_equal_the_xml():
    m = xmlcodec.decode((VECTORS / "01-pkg1-client-init.xml").read_bytes())
    for name in ("01-pkg1-client-init.nostr.wbxml", "01-pkg1-client-init.literal-fpi.wbxml"):
        assert _wbxml.decode((VECTORS / name).read_bytes()) == m


def _run(args: list[str]) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.mark.parametrize("xml", [x for x, _ in PAIRS if x.parent == VECTORS][:6], ids=lambda p: p.name)
def test_libwbxml_between_our_codecs(xml, tmp_path):
    """Our XML -> libwbxml xml2wbxml -> our WBXML decoder, and our WBXML -> libwbxml wbxml2xml
    -> our XML decoder: the same model every way."""
    m = xmlcodec.decode(xml.read_bytes())
    (tmp_path / "ours.xml").write_bytes(xmlcodec.encode(m))
    _run([XML2WBXML, "-v", "1.3", "-o", str(tmp_path / "lib.wbxml"), str(tmp_path / "ours.xml")])
    assert _wbxml.decode((tmp_path / "lib.wbxml").read_bytes()) == m
    (tmp_path / "ours.wbxml").write_bytes(_wbxml.encode(m))
    _run([WBXML2XML, "-o", str(tmp_path / "lib.xml"), str(tmp_path / "ours.wbxml")])
    assert xmlcodec.decode((tmp_path / "lib.xml").read_bytes()) == m


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategies.messages(binary=False))
def test_random_message_through_both_codecs(msg):
    via_xml = xmlcodec.decode(xmlcodec.encode(msg))
    via_wbxml = _wbxml.decode(_wbxml.encode(msg))
    assert via_xml == via_wbxml == msg
    assert _wbxml.decode(_wbxml.encode(via_xml, string_table=True)) == msg


def test_tnds_element_data_crosses_codecs():
    tree = Element(tag="MgmtTree", xmlns="syncml:dmddf1.2", children=[
        Element(tag="VerDTD", text="1.2"),
        Element(tag="Node", children=[Element(tag="NodeName", text="Acme"),
                                      Element(tag="RTProperties", children=[
                                          Element(tag="Format", children=[Element(tag="node")])])])])
    msg = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1", msg_id="1"),
                  commands=[Command(name="Add", cmd_id="1", items=[Item(
                      target="./Vendor", meta=Meta(type=strategies.TNDS_WBXML, format="xml"), data=tree)])],
                  final=True)
    assert xmlcodec.decode(xmlcodec.encode(msg)) == _wbxml.decode(_wbxml.encode(msg)) == msg


# --- codec_for ------------------------------------------------------------------------------


@pytest.mark.parametrize("ct,name,answer", [
    ("application/vnd.syncml.dm+xml", "xml", "application/vnd.syncml.dm+xml"),
    ("application/vnd.syncml.dm+wbxml", "wbxml", "application/vnd.syncml.dm+wbxml"),
    ("application/vnd.syncml+xml", "xml", "application/vnd.syncml+xml"),
    ("application/vnd.syncml+wbxml", "wbxml", "application/vnd.syncml+wbxml"),
    ('application/vnd.syncml.dm+xml; charset="utf-8"', "xml", "application/vnd.syncml.dm+xml"),
    ("Application/VND.SyncML.DM+XML;charset=UTF-8", "xml", "application/vnd.syncml.dm+xml"),
    ("application/vnd.syncml.dm+wbxml ; charset=utf8 ; x=y", "wbxml", "application/vnd.syncml.dm+wbxml"),
])
def test_codec_for_accepts(ct, name, answer):
    c = codec.codec_for(ct)
    assert (c.name, c.content_type) == (name, answer)
    data = (VECTORS / "02-pkg2-server-get-replace-exec.xml").read_bytes()
    msg = xmlcodec.decode(data)
    assert c.decode(c.encode(msg)) == msg


@pytest.mark.parametrize("ct,what", [
    (None, "media type"), ("", "media type"), ("text/xml", "media type"),
    ("application/xml; charset=utf-8", "media type"),
    ('application/vnd.syncml.dm+xml; charset="iso-8859-1"', "charset"),
    ("application/vnd.syncml.dm+xml; charset=utf-16", "charset"),
    ("application/vnd.syncml.dm+xml; garbage", "media type"),
])
def test_codec_for_refuses(ct, what):
    with pytest.raises(UnsupportedContentType) as ei:
        codec.codec_for(ct)
    assert isinstance(ei.value, CodecError) and ei.value.what == what and ei.value.expected


def test_codecs_decode_take_the_limits():
    data = (VECTORS / "01-pkg1-client-init.wbxml").read_bytes()
    with pytest.raises(CodecError, match="max_size"):
        codec.WBXML.decode(data, max_size=10)
    with pytest.raises(CodecError, match="max_depth"):
        codec.XML.decode((VECTORS / "01-pkg1-client-init.xml").read_bytes(), max_depth=3)
