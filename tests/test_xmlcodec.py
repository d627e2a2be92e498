"""XML codec (dmengine.xmlcodec / dmengine._xml): vectors, lxml infoset, libwbxml, rules, errors."""
from __future__ import annotations

import ast
import inspect
import pathlib
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

import strategies
from conftest import BENCH_MESSAGES, VECTORS, shared_files
from dmengine import _xml, xmlcodec
from dmengine.errors import CodecError
from dmengine.message import Chal, Command, Cred, Element, Item, Message, Meta, SyncHdr

# (shared_files: a missing ../shared fails the module's collection, never skips its tests)
GOOD = [p for p in shared_files(VECTORS, "*.xml") if not p.name.startswith("bad-")]
BENCH = shared_files(BENCH_MESSAGES, "msg_*.xml")
ALL_GOOD = GOOD + BENCH
SYNCML = "SYNCML:SYNCML1.2"
METINF = "syncml:metinf"
XML2WBXML = shutil.which("xml2wbxml") or "/usr/bin/xml2wbxml"
WBXML2XML = shutil.which("wbxml2xml") or "/usr/bin/wbxml2xml"


def doc(body: str, hdr: str = "<VerDTD>1.2</VerDTD>", root: str = f'<SyncML xmlns="{SYNCML}">',
        prolog: str = "") -> bytes:
    close = "</" + root[1:].split()[0].rstrip(">") + ">"
    return (prolog + root + f"<SyncHdr>{hdr}</SyncHdr><SyncBody>{body}</SyncBody>" + close).encode()


def err(data: bytes, **kw) -> CodecError:
    with pytest.raises(CodecError) as ei:
        xmlcodec.decode(data, **kw)
    assert ei.value.offset is not None and 0 <= ei.value.offset <= max(len(data), kw.get("max_size", 0))
    return ei.value


# --- infoset (what lxml sees) -------------------------------------------------------------


def infoset(el: etree._Element, in_meta: bool = False) -> tuple:
    """(qualified tag, text, children): whitespace-only text between elements dropped, text
    of leaves exact; MetInf children of Meta compared in any order (the encoder writes them in
    DTD order, 05 sends Type before Format)."""
    kids = [c for c in el if isinstance(c.tag, str)]
    text = el.text or ""
    for c in kids:
        text += c.tail or ""
    if kids and not text.strip(" \t\r\n"):
        text = ""
    qn = etree.QName(el)
    ns = (qn.namespace or "").lower()
    if ns.startswith("syncml:syncml1"):
        ns = "syncml"
    tag = (ns, qn.localname)
    children = [infoset(c, qn.localname == "Meta") for c in kids]
    if qn.localname == "Meta":
        children.sort()
    return (tag, text, tuple(children))


def lxml_infoset(data: bytes) -> tuple:
    return infoset(etree.fromstring(data, etree.XMLParser(resolve_entities=False)))


# --- vectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_GOOD, ids=lambda p: p.name)
def test_vector_decodes_round_trips_and_keeps_the_infoset(path):
    src = path.read_bytes()
    msg = xmlcodec.decode(src)
    assert isinstance(msg, Message) and msg.hdr.ver_dtd == "1.2" and msg.commands
    out = xmlcodec.encode(msg)
    assert xmlcodec.decode(out) == msg
    assert xmlcodec.encode(xmlcodec.decode(out)) == out          # encoding is stable
    assert lxml_infoset(out) == lxml_infoset(src)
    assert out.startswith(b'<?xml version="1.0" encoding="UTF-8"?><SyncML xmlns="SYNCML:SYNCML1.2">')


def test_vector_01_content():
    m = xmlcodec.decode((VECTORS / "01-pkg1-client-init.xml").read_bytes())
    h = m.hdr
    assert (h.ver_dtd, h.ver_proto, h.session_id, h.msg_id) == ("1.2", "DM/1.2", "1A2B", "1")
    assert (h.target, h.source, h.source_name) == ("https://dm.example.com/dm", "IMEI:356938035643809", "dmclient01")
    assert h.cred == Cred(meta=Meta(format="b64", type="syncml:auth-md5"), data="tm7hGTZC6ySmdLd9yJZRmw==")
    assert h.meta == Meta(max_msg_size="10000", max_obj_size="524288")
    assert m.commands[0] == Command(name="Alert", cmd_id="1", data="1200")
    rep = m.commands[1]
    assert rep.name == "Replace" and rep.cmd_id == "2" and len(rep.items) == 5
    assert rep.items[0] == Item(source="./DevInfo/DevId", data="IMEI:356938035643809")
    assert m.final is True


def test_vector_02_status_chal_exec():
    m = xmlcodec.decode((VECTORS / "02-pkg2-server-get-replace-exec.xml").read_bytes())
    assert m.hdr.resp_uri == "https://dm.example.com/dm?s=1A2B-7f3c"
    st0 = m.commands[0]
    assert (st0.name, st0.msg_ref, st0.cmd_ref, st0.cmd, st0.data) == ("Status", "1", "0", "SyncHdr", "212")
    assert st0.target_refs == ["https://dm.example.com/dm"] and st0.source_refs == ["IMEI:356938035643809"]
    assert st0.chal == Chal(meta=Meta(format="b64", type="syncml:auth-md5", next_nonce="VWZ3iJmqu8zd7v8AESIzRA=="))
    ex = m.commands[5]
    assert (ex.name, ex.correlator, ex.items[0].target) == ("Exec", "fw-job-8842", "./FUMO/1/DownloadAndUpdate")


def test_vector_06_cdata_and_more_data():
    m = xmlcodec.decode((VECTORS / "06-large-object-moredata.xml").read_bytes())
    rep = m.commands[1]
    assert rep.meta == Meta(format="b64", type="application/octet-stream")
    it = rep.items[0]
    assert it.meta == Meta(size="1536") and it.more_data is True
    assert isinstance(it.data, str) and len(it.data) == 1364 and it.data.startswith("CzBVep/E")
    assert m.final is False


def test_vector_07_entities_and_containers():
    m = xmlcodec.decode((VECTORS / "07-atomic-sequence.xml").read_bytes())
    atomic, seq = m.commands[3], m.commands[4]
    assert atomic.name == "Atomic" and [c.name for c in atomic.commands] == ["Add", "Add", "Replace"]
    assert atomic.commands[2].items[0].data == "Get=acme-dms&Replace=acme-dms&Delete=acme-dms"
    assert [c.cmd_id for c in seq.commands] == ["9", "10", "11"]
    assert seq.commands[0].items[0].data == "MINDT=5&MAXDT=120&DR=1"


def test_vector_05_metinf_in_any_order():
    m = xmlcodec.decode((VECTORS / "05-generic-alert-1226-fumo.xml").read_bytes())
    assert m.commands[2].items[0].meta == Meta(
        type="org.openmobilealliance.dm.firmwareupdate.downloadandupdate", format="int", mark="informational")


def test_bench_messages_sizes():
    counts = [len(xmlcodec.decode(p.read_bytes()).commands) for p in BENCH]
    assert counts == [2, 53, 71]


# --- libwbxml: our XML is what xml2wbxml expects --------------------------------------------


def _libwbxml_round_trip(xml: bytes, tmp: pathlib.Path) -> tuple[bytes, bytes]:
    (tmp / "in.xml").write_bytes(xml)
    subprocess.run([XML2WBXML, "-v", "1.3", "-o", str(tmp / "out.wbxml"), str(tmp / "in.xml")],
                   check=True, capture_output=True, timeout=30)
    subprocess.run([WBXML2XML, "-o", str(tmp / "back.xml"), str(tmp / "out.wbxml")],
                   check=True, capture_output=True, timeout=30)
    return (tmp / "out.wbxml").read_bytes(), (tmp / "back.xml").read_bytes()


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_libwbxml_reads_our_xml(path, tmp_path):
    """xml2wbxml compiles our output, wbxml2xml turns it back into XML we decode to the same
    model; where the vector is in DTD order the WBXML is byte-identical to the vector's."""
    msg = xmlcodec.decode(path.read_bytes())
    ours = xmlcodec.encode(msg)
    wbxml, back = _libwbxml_round_trip(ours, tmp_path)
    assert xmlcodec.decode(back) == msg
    assert lxml_infoset(back) == lxml_infoset(ours)
    if path.stem != "05-generic-alert-1226-fumo":      # 05 sends Type before Format
        assert wbxml == path.with_suffix(".wbxml").read_bytes()


def test_libwbxml_output_with_doctype_decodes(tmp_path):
    """wbxml2xml writes a DOCTYPE (public id, no internal subset) and indents: accepted."""
    src = (VECTORS / "07-atomic-sequence.xml").read_bytes()
    subprocess.run([WBXML2XML, "-o", str(tmp_path / "x.xml"), str(VECTORS / "07-atomic-sequence.wbxml")],
                   check=True, capture_output=True, timeout=30)
    back = (tmp_path / "x.xml").read_bytes()
    assert b"<!DOCTYPE SyncML PUBLIC" in back
    assert xmlcodec.decode(back) == xmlcodec.decode(src)


# --- what the decoder accepts ---------------------------------------------------------------


def test_namespace_forms_give_equal_models():
    base = xmlcodec.decode(doc(f'<Get><CmdID>1</CmdID><Meta><Type xmlns="{METINF}">text/plain</Type></Meta></Get>'))
    forms = [
        doc(f'<Get><CmdID>1</CmdID><Meta xmlns:mi="{METINF}"><mi:Type>text/plain</mi:Type></Meta></Get>'),
        doc('<Get><CmdID>1</CmdID><Meta><mi:Type>text/plain</mi:Type></Meta></Get>',
            root=f'<SyncML xmlns="{SYNCML}" xmlns:mi="{METINF}">'),
        doc('<Get><CmdID>1</CmdID><Meta><Type xmlns="SYNCML:METINF">text/plain</Type></Meta></Get>',
            root='<SyncML xmlns="syncml:syncml1.2">'),
        doc('<Get><CmdID>1</CmdID><Meta><Type>text/plain</Type></Meta></Get>', root="<SyncML>"),
        doc(f'<Get><CmdID>1</CmdID><Meta xmlns="{METINF}"><Type>text/plain</Type></Meta></Get>'),
        doc(f'<s:Get><s:CmdID>1</s:CmdID><s:Meta><Type xmlns="{METINF}">text/plain</Type></s:Meta></s:Get>',
            root=f'<s:SyncML xmlns:s="{SYNCML}">').replace(b"<SyncHdr>", b"<s:SyncHdr>").replace(
            b"</SyncHdr>", b"</s:SyncHdr>").replace(b"<VerDTD>", b"<s:VerDTD>").replace(
            b"</VerDTD>", b"</s:VerDTD>").replace(b"<SyncBody>", b"<s:SyncBody>").replace(b"</SyncBody>", b"</s:SyncBody>"),
    ]
    for data in forms:
        assert xmlcodec.decode(data) == base, data
    assert xmlcodec.decode(doc("", root='<SyncML xmlns="SYNCML:SYNCML1.1">')).hdr.ver_dtd == "1.2"


def test_prolog_doctype_comments_pis_bom():
    plain = xmlcodec.decode(doc("<Final/>"))
    variants = [
        doc("<Final/>", prolog='<?xml version="1.0" encoding="utf-8" standalone="yes"?>\n'),
        b"\xef\xbb\xbf" + doc("<Final/>", prolog="<?xml version='1.0'?>"),
        doc("<Final/>", prolog='<!DOCTYPE SyncML PUBLIC "-//SYNCML//DTD SyncML 1.2//EN" '
                              '"http://www.openmobilealliance.org/tech/DTD/OMA-TS-SyncML_RepPro_DTD-V1_2.dtd">\n'),
        doc("<Final/>", prolog="<!DOCTYPE SyncML>"),
        doc("<!-- c --><?pi x?><Final/><!-- after -->", prolog="<!-- before --><?app data?>") + b"\n<!-- end -->\n",
        doc(" \n <Final\n/> \n"),
    ]
    for data in variants:
        assert xmlcodec.decode(data) == plain, data


def test_text_is_kept_exactly_and_references_expanded():
    m = xmlcodec.decode(doc('<Alert><CmdID> 1 </CmdID><Data>a&amp;b&lt;c&gt;d&quot;e&apos;f&#65;&#x42;&#x1F600;</Data>'
                            '<Item><Data>\n  two\r\nlines\r<![CDATA[<raw & ]] stuff>\r\n]]>&#13;</Data></Item></Alert>'))
    a = m.commands[0]
    assert a.cmd_id == " 1 "
    assert a.data == "a&b<c>d\"e'fAB\U0001F600"
    assert a.items[0].data == "\n  two\nlines\n<raw & ]] stuff>\n\r"


def test_empty_and_absent():
    m = xmlcodec.decode(doc("<Replace><CmdID/><Item><Data></Data></Item><Item><Target/></Item></Replace>"))
    r = m.commands[0]
    assert r.cmd_id == "" and r.items[0].data == "" and r.items[1] == Item()
    assert r.meta is None and r.target_refs is None and r.commands is None


def test_tnds_data_becomes_an_element_tree():
    tnds = ('<MgmtTree xmlns="syncml:dmddf1.2"><VerDTD>1.2</VerDTD>\n <Node><NodeName>a</NodeName>'
            '<RTProperties><Format><chr/></Format></RTProperties><Value> x &amp; y </Value></Node></MgmtTree>')
    m = xmlcodec.decode(doc(f'<Replace><CmdID>1</CmdID><Item><Meta><Type xmlns="{METINF}">'
                            f'application/vnd.syncml.dmtnds+xml</Type></Meta><Data>\n {tnds}\n</Data></Item></Replace>'))
    tree = m.commands[0].items[0].data
    assert tree == Element(tag="MgmtTree", xmlns="syncml:dmddf1.2", children=[
        Element(tag="VerDTD", text="1.2"),
        Element(tag="Node", children=[
            Element(tag="NodeName", text="a"),
            Element(tag="RTProperties", children=[Element(tag="Format", children=[Element(tag="chr")])]),
            Element(tag="Value", text=" x & y "),
        ]),
    ])
    again = xmlcodec.decode(xmlcodec.encode(m))
    assert again == m
    assert b'<Data><MgmtTree xmlns="syncml:dmddf1.2"><VerDTD>1.2</VerDTD>' in xmlcodec.encode(m)


def test_unknown_syncbody_commands_keep_name_and_cmdid():
    m = xmlcodec.decode(doc('<Sync><CmdID>4</CmdID><Target><LocURI>db</LocURI></Target><Add><CmdID>5</CmdID>'
                            '<Item><Data><x:y xmlns:x="urn:x">z</x:y></Data></Item></Add></Sync>'
                            '<Put><CmdID>6</CmdID><Meta><Type xmlns="syncml:metinf">a</Type></Meta></Put>'
                            '<Atomic><CmdID>7</CmdID><Map><CmdID>8</CmdID><MapItem/></Map></Atomic>'
                            '<Search/><Final/>'))
    assert m.commands == [Command(name="Sync", cmd_id="4"), Command(name="Put", cmd_id="6"),
                          Command(name="Atomic", cmd_id="7", commands=[Command(name="Map", cmd_id="8")]),
                          Command(name="Search")]


def test_meta_extra():
    m = xmlcodec.decode(doc(f'<Alert><Meta xmlns:m="{METINF}"><m:EMI>e1</m:EMI><m:Anchor><m:Last>1</m:Last>'
                            '<m:Next>2</m:Next></m:Anchor><m:Mem><m:SharedMem/><m:FreeMem>9</m:FreeMem></m:Mem>'
                            '<m:MetInf><m:Format>b64</m:Format></m:MetInf><m:EMI>e2</m:EMI></Meta></Alert>'))
    assert m.commands[0].meta.extra == [
        ("EMI", "e1"), ("Anchor", [("Last", "1"), ("Next", "2")]), ("Mem", [("SharedMem", ""), ("FreeMem", "9")]),
        ("MetInf", [("Format", "b64")]), ("EMI", "e2")]
    assert xmlcodec.decode(xmlcodec.encode(m)) == m


def test_dropped_elements_lang_archive():
    m = xmlcodec.decode(doc("<Get><CmdID>1</CmdID><Lang>en</Lang><Item/></Get>"
                            "<Delete><CmdID>2</CmdID><Archive/><SftDel/><Item/></Delete>"))
    assert m.commands == [Command(name="Get", cmd_id="1", items=[Item()]),
                          Command(name="Delete", cmd_id="2", items=[Item()])]


def test_ignored_attributes():
    assert xmlcodec.decode(doc('<Final a="1" b=\'&amp;&#60;\'/>', root=f'<SyncML xmlns="{SYNCML}" xml:lang="en">')).final


# --- what the decoder refuses -----------------------------------------------------------------


def test_entity_bomb_vector_refused_outright():
    e = err((VECTORS / "bad-12-xml-entity-bomb.xml").read_bytes())
    assert "internal subset" in e.reason


REJECT = [
    # (input, reason substring)
    (doc("<Final/>")[:-3], "truncated"),
    (doc("<Get><CmdID>1</CmdID></Alert>"), "mismatched end tag"),
    (doc("<Get><CmdID>1</CmdId></Get>"), "mismatched end tag"),
    (doc("<Frobnicate/>"), "unknown element <Frobnicate> in the SyncML namespace"),
    (doc("<Get><Frob>1</Frob></Get>"), "unknown element <Frob>"),
    (doc("<Get><Item><Target><Filter/></Target></Item></Get>"), "not allowed in <Target>"),
    (doc("<Item/>"), "not a SyncBody command"),
    (doc("<Status><Status/></Status>"), "not allowed in <Status>"),
    (doc("<Final/>", root='<SyncML xmlns="urn:other">'), "root element"),
    (doc("<Final/>", root=f'<SyncML xmlns="{METINF}">'), "root element"),
    (doc('<Get xmlns="urn:x"/>'), "where a SyncML element is expected"),
    (doc(f'<Get><Meta><Type xmlns="urn:x">a</Type></Meta></Get>'), "where a MetInf element is expected"),
    (doc(f'<Get><Meta><Item/></Meta></Get>'), "unknown MetInf element"),
    (doc(f'<Get><Meta><m:Type>a</m:Type></Meta></Get>'), "undeclared namespace prefix"),
    (doc("<Final/>", prolog='<!DOCTYPE SyncML [<!ELEMENT SyncML ANY>]>'), "internal subset"),
    (doc("<Alert><Data>&ent;</Data></Alert>"), "undefined entity &ent;"),
    (doc("<Alert><Data>&amp</Data></Alert>"), "malformed entity reference"),
    (doc("<Alert><Data>&#0;</Data></Alert>"), "character reference to U+0000"),
    (doc("<Alert><Data>&#xD800;</Data></Alert>"), "XML does not allow"),
    (doc("<Alert><Data>&#1114112;</Data></Alert>"), "out of range"),
    (doc("<Alert><Data>&#x;</Data></Alert>"), "malformed character reference"),
    (doc("<Alert><Data>a\x01b</Data></Alert>"), "character U+0001 not allowed"),
    (doc("<Alert><Data>a]]>b</Data></Alert>"), "']]>' not allowed"),
    (doc("<Alert><Data>\ufffe</Data></Alert>"), "U+FFFE"),
    (doc("<Alert>text<CmdID>1</CmdID></Alert>"), "text not allowed in <Alert>"),
    (doc("<Alert><CmdID>1<x/></CmdID></Alert>"), "element <x> not allowed in <CmdID>"),
    (doc("<Alert><CmdID>1</CmdID><CmdID>2</CmdID></Alert>"), "duplicate element <CmdID>"),
    (doc("<Final/><Final/>"), "duplicate element <Final>"),
    (doc("<Final>x</Final>"), "text not allowed in <Final>"),
    (doc("<Get><NoResp><x/></NoResp></Get>"), "must be empty"),
    (doc('<Final a="1" a="2"/>'), "duplicate attribute"),
    (doc('<Final a=1/>'), "expected a quoted value"),
    (doc('<Final a="<"/>'), "'<' not allowed in an attribute value"),
    (doc("<Alert><Data><![CDATA[x]]></Data></Alert>").replace(b"<Alert>", b"<Alert><![CDATA[ ]]>"), "CDATA not allowed"),
    (doc("<Final/>") + b"<SyncML/>", "junk after the root element"),
    (doc("<Final/>") + b"junk", "junk after the root element"),
    (b"junk" + doc("<Final/>"), "text outside the root element"),
    (doc("<Final/>", prolog='<?xml version="1.0" encoding="ISO-8859-1"?>'), "unsupported encoding"),
    (doc("<Final/>", prolog='<?xml version="1.0" encoding="UTF-16"?>'), "unsupported encoding"),
    (doc("<Final/>", prolog='<?xml version="2.0"?>'), "unsupported XML version"),
    (b" " + doc("<Final/>", prolog='<?xml version="1.0"?>'), "XML declaration only allowed at the very start"),
    (doc("<Final/>", prolog="<?xml?>"), "XML declaration"),
    (doc("<Final/>", prolog='<?xml version="1.0" standalone="yes" standalone="no"?>'), "unexpected 'standalone'"),
    (doc("<Final/>", prolog='<?xml encoding="UTF-8" version="1.0"?>'), "unexpected 'encoding'"),
    ("<SyncML/>".encode("utf-16"), "not UTF-8"),
    (doc("<Alert><Data>\xff</Data></Alert>").replace("\xff".encode(), b"\xff"), "invalid UTF-8"),
    (doc("<Alert><Data>\xe9</Data></Alert>").replace("\xe9".encode(), b"\xc3"), "invalid UTF-8"),
    (doc("<Alert><Data>x</Data></Alert>").replace(b"x", b"\xed\xa0\x80"), "invalid UTF-8"),
    (doc("<Alert><Data>x</Data></Alert>").replace(b"x", b"\xc0\xaf"), "invalid UTF-8"),
    (doc("<Final/>", prolog="<!-- \xff -->").replace("\xff".encode(), b"\xff"), "invalid UTF-8"),
    (doc("<Final/>", prolog="<!-- a -- b -->"), "'--' not allowed"),
    (b"", "empty document"),
    (b"<SyncML xmlns='SYNCML:SYNCML1.2'><SyncBody/></SyncML>", "<SyncBody> before <SyncHdr>"),
    (b"<SyncML xmlns='SYNCML:SYNCML1.2'><SyncHdr/></SyncML>", "no <SyncBody>"),
    (b"<SyncML xmlns='SYNCML:SYNCML1.2'/>", "no <SyncHdr>"),
    (doc("<Alert><Data><a/><b/></Data></Alert>"), "element <a> not allowed in <Data>"),
    (doc("<Get><Item><Data><a/><b/></Data></Item></Get>"), "more than one element"),
    (doc("<Get><Item><Data>t<a/></Data></Item></Get>"), "mixes text and an element"),
    (doc("<Final/>", root='<SyncML xmlns:p="">'), "cannot be bound to the empty name"),
    (doc("<:Final/>"), "malformed qualified name"),
    (doc("<1Final/>"), "expected an element name"),
    (doc("<Final/>").replace(b"<Final/>", b"<Final/ >"), "expected '>' after '/'"),
]


@pytest.mark.parametrize("data,reason", REJECT, ids=[r for _, r in REJECT])
def test_rejections(data, reason):
    e = err(data)
    assert reason in str(e), str(e)


def test_error_names_offset_and_expectation():
    data = doc("<Get><CmdID>1</CmdID></Alert>")
    e = err(data)
    assert e.offset == data.index(b"</Alert>") and e.expected == "</Get>"
    data = doc("<Alert><Data>ok\xff</Data></Alert>").replace("\xff".encode(), b"\xff")
    assert err(data).offset == data.index(b"\xff")
    data = doc('<Frob/>')
    assert err(data).offset == data.index(b"<Frob")


def test_depth_limit():
    nested = doc("<Atomic>" * 20 + "</Atomic>" * 20)
    assert xmlcodec.decode(nested, max_depth=22)          # SyncML, SyncBody, 20 x Atomic
    e = err(nested, max_depth=21)
    assert "max_depth=21" in e.reason and e.offset == nested.index(b"<Atomic>" * 20) + 19 * 8
    deep = doc("<Get><Item><Data>" + "<a>" * 100_000 + "</a>" * 100_000 + "</Data></Item></Get>")
    assert "nested deeper" in err(deep).reason            # refused by the limit, not the C stack
    with pytest.raises(ValueError):
        xmlcodec.decode(nested, max_depth=_xml.MAX_DEPTH_CAP + 1)


def test_size_limit():
    data = doc("<Final/>")
    assert xmlcodec.decode(data, max_size=len(data))
    e = err(data, max_size=len(data) - 1)
    assert e.offset == len(data) - 1 and "max_size" in e.reason
    assert xmlcodec.DEFAULT_MAX_SIZE == _xml.DEFAULT_MAX_SIZE >= 1 << 20
    assert xmlcodec.DEFAULT_MAX_DEPTH == _xml.DEFAULT_MAX_DEPTH == 32


def test_decode_takes_bytes_like_only():
    data = doc("<Final/>")
    assert xmlcodec.decode(bytearray(data)) == xmlcodec.decode(memoryview(data)) == xmlcodec.decode(data)
    with pytest.raises(CodecError):
        xmlcodec.decode(data.decode())  # type: ignore[arg-type]


@pytest.mark.parametrize("path", GOOD + BENCH[:1], ids=lambda p: p.name)
def test_every_truncation_raises_codec_error(path):
    data = path.read_bytes().rstrip()
    for n in range(len(data)):
        with pytest.raises(CodecError):
            xmlcodec.decode(data[:n])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_vectors_decode_or_raise_codec_error(data):
    src = bytearray(data.draw(st.sampled_from(ALL_GOOD[:-2])).read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(src) - 1))
        op = data.draw(st.integers(0, 2))
        if op == 0:
            src[i] = data.draw(st.integers(0, 255))
        elif op == 1:
            del src[i]
        else:
            src[i:i] = data.draw(st.sampled_from([b"<", b">", b"&", b"</", b"<!--", b"]]>", b"\xff", b"<x>", b"\x00"]))
    try:
        msg = xmlcodec.decode(bytes(src))
    except CodecError:
        return
    assert xmlcodec.decode(xmlcodec.encode(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_codec_error(data):
    try:
        xmlcodec.decode(b'<SyncML xmlns="SYNCML:SYNCML1.2">' + data)
    except CodecError:
        pass


# --- encoder --------------------------------------------------------------------------------


def test_encode_escapes_and_cr():
    msg = Message(hdr=SyncHdr(ver_dtd="1.2"), commands=[
        Command(name="Alert", cmd_id="1", data="<a> & \"b\" ]]> \r\n\t")])
    out = xmlcodec.encode(msg)
    assert b'<Data>&lt;a&gt; &amp; "b" ]]&gt; &#13;\n\t</Data>' in out
    assert xmlcodec.decode(out) == msg
    assert etree.fromstring(out).find(f"{{{SYNCML}}}SyncBody/{{{SYNCML}}}Alert/{{{SYNCML}}}Data").text == "<a> & \"b\" ]]> \r\n\t"


def test_encode_bytes_data():
    msg = Message(commands=[Command(name="Replace", items=[Item(data=b"caf\xc3\xa9 <x>"), Item(data=b"a\r]]>b")])])
    out = xmlcodec.encode(msg)
    assert "<Data><![CDATA[café <x>]]></Data>".encode() in out
    m = xmlcodec.decode(out)
    assert [it.data for it in m.commands[0].items] == ["café <x>", "a\r]]>b"]
    with pytest.raises(CodecError, match="b64"):
        xmlcodec.encode(Message(commands=[Command(name="Replace", items=[Item(data=b"\xff\x00")])]))


@pytest.mark.parametrize("msg,reason", [
    (Message(hdr=SyncHdr(session_id="a\x00b")), "U+0000 cannot be carried"),
    (Message(hdr=SyncHdr(session_id="\ufffe")), "U+FFFE"),
    (Message(hdr=SyncHdr(session_id="\ud800")), "lone surrogate"),
    (Message(commands=[Command(name="Frob")]), "cannot encode command 'Frob'"),
    (Message(commands=[Command(name="Get", items=["x"])]), "must hold Items"),
    (Message(commands=["x"]), "must hold Commands"),
    (Message(commands=[Command(name="Alert", data=Element(tag="a"))]), "cannot encode Data of type Element"),
    (Message(commands=[Command(name="Alert", data=3)]), "cannot encode Data of type int"),
    (Message(commands=[Command(name="Get", items=[Item(data=Element(tag="a b"))])]), "not an XML name"),
    (Message(commands=[Command(name="Get", meta=Meta(extra=[("Format", "x")]))]), "not a MetInf element"),
    (Message(commands=[Command(name="Get", meta=Meta(extra=[("Anchor", "x")]))]), "holds a list"),
    (Message(commands=[Command(name="Get", meta=Meta(extra=[("EMI", [("Last", "1")])]))]), "holds a str"),
    (Message(commands=[Command(name="Get", meta=Meta(extra=["EMI"]))]), "(name, value) pairs"),
    (Message(commands=[Command(name="Get", meta=Meta(extra=[("Mem", [("Mem", "1")])]))]), "not a MetInf element"),
])
def test_encode_rejections(msg, reason):
    with pytest.raises(CodecError) as ei:
        xmlcodec.encode(msg)
    assert reason in str(ei.value)


def test_encode_refuses_cyclic_models_and_non_messages():
    seq = Command(name="Sequence", cmd_id="1")
    seq.commands = [seq]
    with pytest.raises(CodecError, match="nested deeper"):
        xmlcodec.encode(Message(commands=[seq]))
    el = Element(tag="a")
    el.children = [el]
    with pytest.raises(CodecError, match="nested deeper"):
        xmlcodec.encode(Message(commands=[Command(name="Get", items=[Item(data=el)])]))
    with pytest.raises(CodecError):
        xmlcodec.encode("not a message")  # type: ignore[arg-type]


def test_encode_dtd_order_and_namespaces():
    msg = Message(hdr=SyncHdr(ver_dtd="1.1", ver_proto="DM/1.1", session_id="1", msg_id="2", target="t",
                              source="s", source_name="n", resp_uri="r", no_resp=True,
                              cred=Cred(meta=Meta(type="syncml:auth-basic", format="b64"), data="x"),
                              meta=Meta(max_msg_size="1")),
                  commands=[Command(name="Results", cmd_id="3", msg_ref="1", cmd_ref="2", meta=Meta(format="chr"),
                                    target_refs=["a"], source_refs=["b"], items=[Item(source="./x", data="v")])],
                  final=True)
    out = xmlcodec.encode(msg).decode()
    assert out == (
        '<?xml version="1.0" encoding="UTF-8"?><SyncML xmlns="SYNCML:SYNCML1.1"><SyncHdr><VerDTD>1.1</VerDTD>'
        '<VerProto>DM/1.1</VerProto><SessionID>1</SessionID><MsgID>2</MsgID><Target><LocURI>t</LocURI></Target>'
        '<Source><LocURI>s</LocURI><LocName>n</LocName></Source><RespURI>r</RespURI><NoResp/><Cred><Meta>'
        '<Format xmlns="syncml:metinf">b64</Format><Type xmlns="syncml:metinf">syncml:auth-basic</Type></Meta>'
        '<Data>x</Data></Cred><Meta><MaxMsgSize xmlns="syncml:metinf">1</MaxMsgSize></Meta></SyncHdr><SyncBody>'
        '<Results><CmdID>3</CmdID><MsgRef>1</MsgRef><CmdRef>2</CmdRef><Meta><Format xmlns="syncml:metinf">chr'
        '</Format></Meta><TargetRef>a</TargetRef><SourceRef>b</SourceRef><Item><Source><LocURI>./x</LocURI>'
        '</Source><Data>v</Data></Item></Results><Final/></SyncBody></SyncML>')


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategies.messages(binary=False, tnds_type=strategies.TNDS_XML))
def test_property_round_trip(msg):
    out = xmlcodec.encode(msg)
    assert xmlcodec.decode(out) == msg
    etree.fromstring(out)                                # well-formed for lxml too


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategies.messages(binary=False))
def test_property_lxml_sees_the_model(msg):
    """Differential against lxml: the leaf texts lxml reads from our output are the model's."""
    out = xmlcodec.encode(msg)
    root = etree.fromstring(out)
    hdr = root.find(f"{{{SYNCML}}}SyncHdr")
    for field, tag in (("session_id", "SessionID"), ("msg_id", "MsgID"), ("resp_uri", "RespURI")):
        el = hdr.find(f"{{{SYNCML}}}{tag}")
        value = getattr(msg.hdr, field)
        assert (el is None) == (value is None)
        if el is not None:
            assert (el.text or "") == value
    body = [c for c in root.find(f"{{{SYNCML}}}SyncBody") if etree.QName(c).localname != "Final"]
    assert [etree.QName(c).localname for c in body] == [c.name for c in msg.commands]
    for el, cmd in zip(body, msg.commands):
        d = el.find(f"{{{SYNCML}}}Data")
        assert (d is None) == (cmd.data is None)
        if d is not None:
            assert (d.text or "") == cmd.data


# --- the stub matches the module ----------------------------------------------------------------


def test_pyi_matches_module():
    pyi = pathlib.Path(_xml.__file__).with_name("_xml.pyi")
    tree = ast.parse(pyi.read_text())
    declared = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            declared[node.name] = node
        elif isinstance(node, ast.AnnAssign):
            declared[node.target.id] = node
    for name, node in declared.items():
        assert hasattr(_xml, name), f"_xml.pyi declares {name}, the module lacks it"
        if isinstance(node, ast.FunctionDef):
            params = [a.arg for a in node.args.args] + [a.arg for a in node.args.kwonlyargs]
            assert params == list(inspect.signature(getattr(_xml, name)).parameters), name
    public = {n for n, v in vars(_xml).items()
              if not n.startswith("_") and getattr(v, "__module__", "dmengine._xml") == "dmengine._xml"}
    assert public <= set(declared), f"undeclared in _xml.pyi: {public - set(declared)}"
