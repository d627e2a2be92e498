"""Hot path: the codecs (L1), decode and encode, on the protocol vectors of ../shared.

Each group puts ours next to same-process baselines on the same message:

* ``libwbxml`` — Debian's libwbxml2 (C), ``wbxml_tree_from_wbxml`` + ``wbxml_tree_destroy``
  and ``wbxml_tree_to_wbxml`` (WBXML 1.3, no string table) + ``wbxml_free``, called through
  ctypes (one foreign call costs ~0.3 µs more than a C caller pays; bench/bench_codec.py has
  the pure-C numbers);
* ``lxml`` — ``etree.fromstring`` / ``etree.tostring`` of the message's XML form (a tree, not
  a DM model: the ceiling of XML parsing in Python).
"""
from __future__ import annotations

import ctypes
import ctypes.util

import pytest
from lxml import etree

from bench.hot.conftest import VECTORS, shared_file
from dmengine import _wbxml, xmlcodec

#: package 1 (DevInfo + Alert 1201), package 2 (Get/Replace/Exec), package 3 (Status + Results)
MESSAGES = ("01-pkg1-client-init", "02-pkg2-server-get-replace-exec", "03-pkg3-client-results")


class _GenParams(ctypes.Structure):
    # WBXMLGenWBXMLParams of libwbxml 0.11 (wbxml_conv.h): an enum and three WB_BOOLs
    _fields_ = [("wbxml_version", ctypes.c_int), ("keep_ignorable_ws", ctypes.c_ubyte),
                ("use_strtbl", ctypes.c_ubyte), ("produce_anonymous", ctypes.c_ubyte)]


class LibWbxml:
    """libwbxml2's tree functions through ctypes (Debian's libwbxml2-dev, ``make deps``)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("wbxml2")
        if name is None:
            raise RuntimeError("libwbxml2 not found: run `make deps` (Debian's libwbxml2-dev)")
        lib = ctypes.CDLL(name)
        self.from_wbxml = lib.wbxml_tree_from_wbxml
        self.from_wbxml.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_int, ctypes.c_int,
                                    ctypes.POINTER(ctypes.c_void_p)]
        self.from_wbxml.restype = ctypes.c_int
        self.destroy = lib.wbxml_tree_destroy
        self.destroy.argtypes = [ctypes.c_void_p]
        self.destroy.restype = None
        self.to_wbxml = lib.wbxml_tree_to_wbxml
        self.to_wbxml.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                  ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(_GenParams)]
        self.to_wbxml.restype = ctypes.c_int
        self.free = lib.wbxml_free
        self.free.argtypes = [ctypes.c_void_p]
        self.free.restype = None
        self.params = _GenParams(0x03, 0, 0, 0)      # WBXML 1.3, no string table

    def tree(self, data: bytes) -> ctypes.c_void_p:
        tree = ctypes.c_void_p()
        err = self.from_wbxml(data, len(data), 0, 0, ctypes.byref(tree))
        if err != 0:
            raise RuntimeError(f"wbxml_tree_from_wbxml failed with error {err}")
        return tree

    def decode(self, data: bytes) -> None:
        self.destroy(self.tree(data))

    def encode(self, tree: ctypes.c_void_p) -> int:
        out, n = ctypes.c_void_p(), ctypes.c_uint()
        err = self.to_wbxml(tree, ctypes.byref(out), ctypes.byref(n), ctypes.byref(self.params))
        if err != 0:
            raise RuntimeError(f"wbxml_tree_to_wbxml failed with error {err}")
        self.free(out)
        return n.value


@pytest.fixture(scope="module")
def libwbxml() -> LibWbxml:
    return LibWbxml()


def _read(name: str, ext: str) -> bytes:
    return shared_file(VECTORS, f"{name}.{ext}").read_bytes()


@pytest.mark.parametrize("name", MESSAGES)
def test_decode_wbxml(benchmark, name):
    data = _read(name, "wbxml")
    benchmark.group = f"decode {name}"
    msg = benchmark(_wbxml.decode, data)
    assert msg.commands


@pytest.mark.parametrize("name", MESSAGES)
def test_decode_libwbxml(benchmark, name, libwbxml):
    data = _read(name, "wbxml")
    benchmark.group = f"decode {name}"
    benchmark(libwbxml.decode, data)


@pytest.mark.parametrize("name", MESSAGES)
def test_decode_xml(benchmark, name):
    data = _read(name, "xml")
    benchmark.group = f"decode {name}"
    msg = benchmark(xmlcodec.decode, data)
    assert msg.commands


@pytest.mark.parametrize("name", MESSAGES)
def test_decode_lxml(benchmark, name):
    data = _read(name, "xml")
    benchmark.group = f"decode {name}"
    benchmark(etree.fromstring, data)


@pytest.mark.parametrize("name", MESSAGES)
def test_encode_wbxml(benchmark, name):
    msg = _wbxml.decode(_read(name, "wbxml"))
    benchmark.group = f"encode {name}"
    out = benchmark(_wbxml.encode, msg)
    assert _wbxml.decode(out).commands


@pytest.mark.parametrize("name", MESSAGES)
def test_encode_libwbxml(benchmark, name, libwbxml):
    tree = libwbxml.tree(_read(name, "wbxml"))
    benchmark.group = f"encode {name}"
    try:
        assert benchmark(libwbxml.encode, tree) > 0
    finally:
        libwbxml.destroy(tree)


@pytest.mark.parametrize("name", MESSAGES)
def test_encode_xml(benchmark, name):
    msg = xmlcodec.decode(_read(name, "xml"))
    benchmark.group = f"encode {name}"
    out = benchmark(xmlcodec.encode, msg)
    assert xmlcodec.decode(out).commands


@pytest.mark.parametrize("name", MESSAGES)
def test_encode_lxml(benchmark, name):
    tree = etree.fromstring(_read(name, "xml"))
    benchmark.group = f"encode {name}"
    benchmark(etree.tostring, tree)
