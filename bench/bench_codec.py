"""Codec benchmark: our WBXML and XML codecs against libwbxml (C), lxml and ElementTree.

On the three messages of ../shared/bench-messages: our WBXML decode/encode, our XML
decode/encode (when dmengine.xmlcodec exists), libwbxml's wbxml_tree_from_wbxml and
wbxml_tree_to_wbxml with and without string table (bench/harness/libwbxml_bench.c, built
here with gcc against libwbxml2-dev), lxml.etree.fromstring/tostring and
xml.etree.ElementTree.fromstring.  msgs/s and MB/s; ratios against the baselines measured
in the same run.  Targets (issue 3): WBXML decode >= 2x libwbxml decode on every message,
WBXML encode >= libwbxml encode without string table, XML decode >= 1.5x lxml.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

from lxml import etree

from bench.common import ROOT, SHARED, Row, rate, write_results

NAME = "codec"
MESSAGES = ("a", "b", "c")
HARNESS_SRC = ROOT / "bench" / "harness" / "libwbxml_bench.c"
HARNESS_BIN = ROOT / "build" / "bench" / "libwbxml_bench"


def build_harness() -> str:
    """Compiles the libwbxml harness (again when the source is newer than the binary)."""
    if HARNESS_BIN.exists() and HARNESS_BIN.stat().st_mtime >= HARNESS_SRC.stat().st_mtime:
        return str(HARNESS_BIN)
    HARNESS_BIN.parent.mkdir(parents=True, exist_ok=True)
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise RuntimeError("gcc not found: the libwbxml baseline needs a C compiler")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libwbxml2"], capture_output=True,
                           text=True, check=True).stdout.split()
    subprocess.run([gcc, "-O2", "-o", str(HARNESS_BIN), str(HARNESS_SRC), *flags], check=True)
    return str(HARNESS_BIN)


def libwbxml(binary: str, path, min_time: float, repeats: int) -> dict:
    out = subprocess.run([binary, str(path), str(min_time), str(repeats)], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    return json.loads(out)


def _xmlcodec():
    try:
        return importlib.import_module("dmengine.xmlcodec")
    except ImportError:
        return None


def run(quick: bool) -> None:
    from dmengine import _wbxml

    min_time, repeats = (0.05, 3) if quick else (0.2, 7)
    binary = build_harness()
    xmlcodec = _xmlcodec()
    rows: list[Row] = []
    summary: dict[str, dict] = {}

    def r(fn) -> float:
        return rate(fn, min_time=min_time, repeats=repeats)

    for name in MESSAGES:
        case = f"msg_{name}"
        wbxml = (SHARED / "bench-messages" / f"msg_{name}.wbxml").read_bytes()
        xml = (SHARED / "bench-messages" / f"msg_{name}.xml").read_bytes()
        msg = _wbxml.decode(wbxml)
        enc = _wbxml.encode(msg)
        enc_st = _wbxml.encode(msg, string_table=True)

        lib = libwbxml(binary, SHARED / "bench-messages" / f"msg_{name}.wbxml", min_time, repeats)
        dec = r(lambda: _wbxml.decode(wbxml))
        e = r(lambda: _wbxml.encode(msg))
        e_st = r(lambda: _wbxml.encode(msg, string_table=True))
        tree = etree.fromstring(xml)
        lx = r(lambda: etree.fromstring(xml))
        lx_out = r(lambda: etree.tostring(tree))
        et = r(lambda: ET.fromstring(xml))

        mb = lambda per_s, n: per_s * n / 1e6  # noqa: E731
        rows += [
            Row.versus(case, "wbxml decode (ours)", dec, "msgs/s", "libwbxml wbxml_tree_from_wbxml", lib["decode"]),
            Row.versus(case, "wbxml decode (ours)", mb(dec, len(wbxml)), "MB/s", "libwbxml wbxml_tree_from_wbxml",
                       mb(lib["decode"], len(wbxml))),
            Row.versus(case, "wbxml encode (ours, no string table)", e, "msgs/s",
                       "libwbxml wbxml_tree_to_wbxml, no string table", lib["encode_nostr"]),
            Row.versus(case, "wbxml encode (ours, no string table)", mb(e, len(enc)), "MB/s",
                       "libwbxml wbxml_tree_to_wbxml, no string table",
                       mb(lib["encode_nostr"], lib["encoded_bytes_nostr"])),
            Row.versus(case, "wbxml encode (ours, string table)", e_st, "msgs/s",
                       "libwbxml wbxml_tree_to_wbxml, string table", lib["encode_strtbl"]),
            Row(case, "libwbxml wbxml_tree_from_wbxml", lib["decode"], "msgs/s"),
            Row(case, "libwbxml wbxml_tree_to_wbxml, no string table", lib["encode_nostr"], "msgs/s"),
            Row(case, "libwbxml wbxml_tree_to_wbxml, string table", lib["encode_strtbl"], "msgs/s"),
            Row(case, "lxml.etree.fromstring", lx, "msgs/s"),
            Row(case, "lxml.etree.fromstring", mb(lx, len(xml)), "MB/s"),
            Row(case, "xml.etree.ElementTree.fromstring", et, "msgs/s"),
        ]
        summary[case] = {
            "wbxml_bytes": len(wbxml), "xml_bytes": len(xml), "our_wbxml_bytes": len(enc),
            "our_wbxml_bytes_string_table": len(enc_st),
            "wbxml_decode_vs_libwbxml": round(dec / lib["decode"], 3),
            "wbxml_encode_vs_libwbxml_nostr": round(e / lib["encode_nostr"], 3),
        }
        if xmlcodec is not None:
            xmsg = xmlcodec.decode(xml)
            xout = xmlcodec.encode(xmsg)
            xd = r(lambda: xmlcodec.decode(xml))
            xe = r(lambda: xmlcodec.encode(xmsg))
            rows += [
                Row.versus(case, "xml decode (ours)", xd, "msgs/s", "lxml.etree.fromstring", lx),
                Row.versus(case, "xml decode (ours)", mb(xd, len(xml)), "MB/s", "lxml.etree.fromstring",
                           mb(lx, len(xml))),
                Row.versus(case, "xml decode (ours)", xd, "msgs/s", "xml.etree.ElementTree.fromstring", et),
                Row.versus(case, "xml encode (ours)", xe, "msgs/s", "lxml.etree.tostring", lx_out),
                Row.versus(case, "xml encode (ours)", mb(xe, len(xout)), "MB/s", "lxml.etree.tostring",
                           mb(lx_out, len(etree.tostring(tree)))),
            ]
            summary[case]["xml_decode_vs_lxml"] = round(xd / lx, 3)
        print(f"{case}: done", flush=True)

    targets = {
        "wbxml_decode_2x_libwbxml": all(s["wbxml_decode_vs_libwbxml"] >= 2 for s in summary.values()),
        "wbxml_encode_1x_libwbxml_nostr": all(s["wbxml_encode_vs_libwbxml_nostr"] >= 1 for s in summary.values()),
        "xml_decode_1.5x_lxml": (all(s["xml_decode_vs_lxml"] >= 1.5 for s in summary.values())
                                  if xmlcodec is not None else None),
    }
    write_results(NAME, rows, messages=summary, targets=targets, quick=quick,
                  harness=os.path.relpath(HARNESS_SRC, ROOT))
