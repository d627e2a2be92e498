#!/usr/bin/env python3
"""Fuzz harness for the SyncML DM decoders.

Invariant (h11's fuzz/afl-server.py style): whatever bytes arrive, ``decode()`` returns a
``Message`` or raises ``CodecError`` -- nothing else, no crash, no hang.  A Message that
decodes must also re-encode, and decode again to an equal Message (WBXML).

    python fuzz/run.py --runs 1000000            # both decoders (XML when dmengine.xmlcodec exists)
    python fuzz/run.py --runs 1000000 --target wbxml
    python fuzz/run.py --runs 20000 --stats      # prints per-outcome counts at exit

The decoders are Cython: atheris only sees coverage of Python code, so libFuzzer cannot
steer by the decoders' branches.  Each libFuzzer input is therefore used two ways
(chosen by its first byte): as raw bytes, or as the seed of a random recipe of
structure-aware mutations (byte flips, WBXML global tokens and huge mb_u_int32s or XML
markup, entities, CDATA and DTD fragments, truncation, splices, repeated ranges) applied to one of the seed vectors, which reaches deep into the
decoder whatever libFuzzer's corpus looks like.
See fuzz/README.md.
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import itertools
import os
import pathlib
import random
import shutil
import sys
import tempfile

import atheris

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
SHARED = pathlib.Path(os.environ.get("DMENGINE_SHARED", ROOT.parent / "shared"))

with atheris.instrument_imports():
    from dmengine import _wbxml
    from dmengine.errors import CodecError
    from dmengine.message import Message
try:
    from dmengine import xmlcodec  # written in parallel; fuzzed when present
except ImportError:  # pragma: no cover - depends on the checkout
    xmlcodec = None

# WBXML bytes worth inserting: global tokens, SyncML/MetInf tags with and without content,
# attribute bit, continuation bytes.
TOKENS = bytes([0x00, 0x01, 0x02, 0x03, 0x04, 0x40, 0x43, 0x44, 0x80, 0x83, 0x84, 0xC0, 0xC3,
                0xC4, 0x6D, 0x6C, 0x6B, 0x54, 0x4F, 0x5A, 0x47, 0x53, 0x64, 0x48, 0x12, 0x34,
                0xFF, 0x8F, 0x7F, 0x6A])
# XML fragments worth inserting: markup, entities, CDATA, DTDs (refused), namespaces, bad bytes.
XML_PIECES = [b"<", b">", b"</", b"/>", b"&amp;", b"&#0;", b"&#x110000;", b"&#xD800;", b"&bogus;",
              b"<![CDATA[", b"]]>", b"<!DOCTYPE SyncML [<!ENTITY a 'b'>]>", b"<!-- c -->", b"<?pi x?>",
              b' xmlns="syncml:metinf"', b' xmlns:m="syncml:metinf"', b"<m:Format>", b"<Meta>", b"</Item>",
              b"<Data>", b"</Data>", b"<Sequence>" * 40, b"\xff", b"\x00", b"\xc3\x28", b"\xef\xbb\xbf",
              b"<?xml version='1.0' encoding='ISO-8859-1'?>", b' a="1"', b"<Final/>"]
MBUINTS = [b"\x8f\xff\xff\xff\x7f", b"\xff\xff\xff\xff\xff\x7f", b"\x90\x80\x80\x80\x00",
           b"\x81\x00", b"\x7f", b"\x00", b"\x80\x80\x80\x80\x80\x80"]

STATS = {"wbxml_ok": 0, "wbxml_codec_error": 0, "xml_ok": 0, "xml_codec_error": 0,
         "xml_not_wbxml_encodable": 0, "inputs": 0}


def load_seeds(kind: str) -> list[bytes]:
    out = []
    for d in (SHARED / "vectors", SHARED / "bench-messages"):
        for p in sorted(d.glob(f"*.{kind}")):
            out.append(p.read_bytes())
    extra = HERE / "seeds"
    if extra.is_dir():
        out.extend(p.read_bytes() for p in sorted(extra.glob(f"*.{kind}")))
    return out


WBXML_SEEDS: list[bytes] = []
XML_SEEDS: list[bytes] = []


def mutate(seed: bytes, rng: random.Random, kind: str = "wbxml") -> bytes:
    """1-8 structure-aware mutations of a seed vector, driven by ``rng``."""
    buf = bytearray(seed)
    seeds = WBXML_SEEDS if kind == "wbxml" else XML_SEEDS
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        if not buf:
            buf.extend(rng.randbytes(4))
            continue
        op = rng.randrange(9)
        i = rng.randrange(len(buf))
        if op == 0:
            buf[i] = rng.randrange(256)
        elif op == 1 and kind == "wbxml":
            buf[i] = rng.choice(TOKENS)
        elif op == 2 and kind == "wbxml":
            buf[i:i] = rng.choice(MBUINTS)
        elif op in (1, 2):
            buf[i:i] = rng.choice(XML_PIECES)
        elif op == 3:
            del buf[rng.randrange(len(buf) + 1):]                           # truncate
        elif op == 4:
            del buf[i:rng.randint(i, min(len(buf), i + 64))]
        elif op == 5:
            j = rng.randint(i, min(len(buf), i + 64))
            buf[i:i] = buf[i:j] * rng.randint(1, 50)                       # repeat a range
        elif op == 6:
            other = rng.choice(seeds)
            buf[i:] = other[rng.randint(0, len(other)):]                   # splice
        elif op == 7:
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        else:
            buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def check_wbxml(data: bytes) -> None:
    try:
        msg = _wbxml.decode(data)
    except CodecError:
        STATS["wbxml_codec_error"] += 1
        return
    assert isinstance(msg, Message), type(msg)
    STATS["wbxml_ok"] += 1
    again = _wbxml.decode(_wbxml.encode(msg))
    assert again == msg, (msg, again)
    assert _wbxml.decode(_wbxml.encode(msg, string_table=True)) == msg


def check_xml(data: bytes) -> None:
    try:
        msg = xmlcodec.decode(data)
    except CodecError:
        STATS["xml_codec_error"] += 1
        return
    assert isinstance(msg, Message), type(msg)
    STATS["xml_ok"] += 1
    # across codecs: what the XML decoder accepts, the WBXML codec encodes (or refuses with
    # CodecError) and decodes to the same model (TNDS Type rewritten as libwbxml does)
    try:
        wbxml = _wbxml.encode(msg)
    except CodecError:
        STATS["xml_not_wbxml_encodable"] += 1
        return
    assert _tnds_as_xml(_wbxml.decode(wbxml)) == _tnds_as_xml(msg)


def _tnds_as_xml(msg: Message) -> Message:
    """A nested-document Type in canonical +xml spelling (the encoder writes +wbxml, and
    matches the Type case-insensitively), in place."""
    canon = {_wbxml.TNDS_WBXML: _wbxml.TNDS_XML, _wbxml.TNDS_XML: _wbxml.TNDS_XML,
             _wbxml.DEVINF_WBXML: _wbxml.DEVINF_XML, _wbxml.DEVINF_XML: _wbxml.DEVINF_XML}

    def walk(cmds):
        for c in cmds or []:
            for m in [c.meta] + [it.meta for it in c.items or []]:
                if m is not None and m.type is not None and m.type.lower() in canon:
                    m.type = canon[m.type.lower()]
            walk(c.commands)
    walk(msg.commands)
    return msg


def save_failure(data: bytes, kind: str) -> None:
    """Keeps the exact decoder input that broke the invariant, for replay."""
    out = HERE / "crashes"
    out.mkdir(exist_ok=True)
    path = out / f"{kind}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    print(f"invariant broken; input saved to {path}", file=sys.stderr, flush=True)


def run_check(check, data: bytes, kind: str) -> None:
    try:
        check(data)
    except Exception:
        save_failure(data, kind)
        raise


def make_target(target: str, runs: int, stats: bool, seed: int):
    do_xml = xmlcodec is not None and target in ("xml", "both")
    do_wbxml = target in ("wbxml", "both")
    counter = itertools.count()
    salt = seed.to_bytes(8, "little")

    def one_input(data: bytes) -> None:
        n = next(counter)
        STATS["inputs"] += 1
        # The recipe depends on libFuzzer's bytes and on the run number, so that runs differ
        # even when libFuzzer's corpus (blind to the Cython code) has shrunk to a few bytes.
        rng = random.Random(data + n.to_bytes(8, "little") + salt)
        mode = rng.randrange(8)
        for kind, seeds, check in (("wbxml", WBXML_SEEDS, check_wbxml), ("xml", XML_SEEDS, check_xml)):
            if not (do_wbxml if kind == "wbxml" else do_xml):
                continue
            if mode == 0:                                   # libFuzzer's bytes as they are
                doc = data
            elif mode == 1:                                 # a seed's prefix + libFuzzer's bytes
                s = rng.choice(seeds)
                doc = s[:rng.randint(0, len(s))] + data
            else:                                           # structure-aware mutations of a seed
                doc = mutate(rng.choice(seeds), rng, kind)
            run_check(check, doc, kind)
        if stats and STATS["inputs"] == runs:
            print("stats: " + " ".join(f"{k}={v}" for k, v in STATS.items()), flush=True)
    return one_input


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fuzz the SyncML DM decoders")
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--target", choices=("wbxml", "xml", "both"), default="both")
    ap.add_argument("--stats", action="store_true", help="print outcome counts at exit")
    ap.add_argument("--seed", type=int, default=0, help="salt of the mutation recipes")
    ap.add_argument("--corpus", help="corpus directory (default: a fresh copy of the seeds)")
    ap.add_argument("libfuzzer_args", nargs="*", help="extra libFuzzer flags, e.g. -max_len=4096")
    args = ap.parse_args(argv)
    if args.target == "xml" and xmlcodec is None:
        ap.error("dmengine.xmlcodec is not available")
    WBXML_SEEDS.extend(load_seeds("wbxml"))
    XML_SEEDS.extend(load_seeds("xml"))
    if args.corpus:
        corpus = pathlib.Path(args.corpus)
        corpus.mkdir(parents=True, exist_ok=True)
    else:
        corpus = pathlib.Path(tempfile.mkdtemp(prefix="dmengine-fuzz-"))
        atexit.register(shutil.rmtree, corpus, True)
    for i, seed in enumerate(WBXML_SEEDS + XML_SEEDS):
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    sys.stdout.flush()
    flags = [f"-runs={args.runs}", "-max_len=4096", "-rss_limit_mb=1024"]
    if args.seed:
        flags.append(f"-seed={args.seed}")
    atheris.Setup([sys.argv[0], *flags, *args.libfuzzer_args, str(corpus)],
                  make_target(args.target, args.runs, args.stats, args.seed))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
