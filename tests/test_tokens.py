"""The generated token tables are up to date with tools/tokens.txt and agree with PROTOCOL.md."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

from dmengine import _tokens

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _gen():
    spec = importlib.util.spec_from_file_location("gen_tokens", ROOT / "tools" / "gen_tokens.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["_tokens.py", "_tokens.pxi"])
def test_generated_file_is_current(tmp_path, name):
    gen = _gen()
    files = gen.render((ROOT / "tools" / "tokens.txt").read_text())
    out = tmp_path / name
    out.write_text(files[name])
    checked_in = (ROOT / "dmengine" / name).read_text()
    assert checked_in.startswith(gen.HEADER), "missing 'do not edit' header"
    assert out.read_text() == checked_in, f"dmengine/{name} is stale: run tools/gen_tokens.py"


def test_check_mode_detects_stale(tmp_path, monkeypatch):
    gen = _gen()
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    (tmp_path / "dmengine").mkdir()
    assert gen.main(["--check"]) == 1          # nothing there yet: stale
    assert gen.main([]) == 0                   # writes
    assert gen.main(["--check"]) == 0
    (tmp_path / "dmengine" / "_tokens.py").write_text("x = 1\n")
    assert gen.main(["--check"]) == 1


def test_table_errors_are_reported():
    gen = _gen()
    with pytest.raises(gen.TableError, match="duplicate"):
        gen.parse("[page x 0 ns]\n0x05 A\n0x05 B\n")
    with pytest.raises(gen.TableError, match="outside"):
        gen.parse("[page x 0 ns]\n0x04 A\n")
    with pytest.raises(gen.TableError, match="unknown section"):
        gen.parse("[bogus]\n")


def test_values_from_protocol_md():
    # PROTOCOL.md §1.3, §1.6, §2 spot checks (examples given there)
    assert (_tokens.SWITCH_PAGE, _tokens.END, _tokens.STR_I, _tokens.STR_T, _tokens.OPAQUE) == (0, 1, 3, 0x83, 0xC3)
    assert _tokens.PUBLIC_ID_SYNCML_1_2 == 0x1201 and _tokens.PUBLIC_ID_SYNCML_1_1 == 0x0FD3
    assert _tokens.PUBLIC_IDS[0x1201] == "-//SYNCML//DTD SyncML 1.2//EN"
    assert _tokens.FPIS["DMDDF_1_2"] == "-//OMA//DTD-DM-DDF 1.2//EN"
    ns, syncml = _tokens.PAGES["syncml"][0]
    assert ns == "SYNCML:SYNCML1.2"
    assert syncml[0x2D] == "SyncML" and syncml[0x12] == "Final" and syncml[0x3C] == "Correlator"
    assert 0x30 not in syncml
    ns, metinf = _tokens.PAGES["syncml"][1]
    assert ns == "syncml:metinf" and metinf[0x13] == "Type" and metinf[0x15] == "MaxObjSize"
    ns, ddf = _tokens.PAGES["dmddf"][2]
    assert ns == "syncml:dmddf1.2" and ddf[0x24] == "Node" and ddf[0x25] == "node" and ddf[0x20] == "MgmtTree"
    assert _tokens.PAGES["devinf"][0][1][0x0A] == "DevInf"
    assert _tokens.NAMESPACES["syncml:metinf"] == ("syncml", 1)
