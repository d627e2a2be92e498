"""A short fuzz run as part of the suite: real inputs through the decoders, invariant held."""
from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

from dmengine.errors import CodecError

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / "fuzz" / "run.py"


def test_short_fuzz_run():
    proc = subprocess.run([sys.executable, str(RUN), "--runs", "20000", "--stats", "--seed", "7"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    m = re.search(r"stats: (.*)", out)
    assert m, out[-3000:]
    stats = dict(kv.split("=") for kv in m.group(1).split())
    assert int(stats["inputs"]) == 20000
    # the inputs really went through the WBXML decoder, both ways out
    assert int(stats["wbxml_ok"]) > 100 and int(stats["wbxml_codec_error"]) > 100
    assert int(stats["wbxml_ok"]) + int(stats["wbxml_codec_error"]) == 20000
    # … and through the XML decoder: run.py fuzzes it only when dmengine.xmlcodec imports, so
    # an XML half that failed to import would otherwise pass unnoticed
    assert int(stats["xml_ok"]) > 100 and int(stats["xml_codec_error"]) > 100
    assert int(stats["xml_ok"]) + int(stats["xml_codec_error"]) == 20000
    assert "Done 20000 runs" in out


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("fuzz_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.WBXML_SEEDS.extend(mod.load_seeds("wbxml"))
    assert mod.xmlcodec is not None, "fuzz/run.py could not import dmengine.xmlcodec"
    return mod


def test_harness_flags_broken_invariant(harness, monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "HERE", tmp_path)

    def bad_decode(data):
        raise ValueError("not a CodecError")

    monkeypatch.setattr(harness._wbxml, "decode", bad_decode)
    with pytest.raises(ValueError):
        harness.run_check(harness.check_wbxml, b"\x03", "wbxml")
    assert list((tmp_path / "crashes").iterdir())      # the input was kept for replay


def test_harness_accepts_codec_error_and_messages(harness):
    seed = harness.WBXML_SEEDS[0]
    harness.check_wbxml(seed)               # decodes, re-encodes, round-trips
    harness.check_wbxml(seed[:10])          # CodecError is fine
    import random
    rng = random.Random(1)
    for _ in range(200):
        doc = harness.mutate(rng.choice(harness.WBXML_SEEDS), rng)
        try:
            harness.check_wbxml(doc)
        except CodecError:  # pragma: no cover - check_wbxml swallows these
            raise AssertionError("check_wbxml must swallow CodecError")


def test_regression_inputs_replay(harness):
    """Inputs that once broke the invariant (kept as fuzz/seeds/regress-*) hold it now."""
    harness.XML_SEEDS.extend(harness.load_seeds("xml"))
    seeds = sorted((ROOT / "fuzz" / "seeds").glob("regress-*"))
    assert seeds
    for path in seeds:
        check = harness.check_xml if path.suffix == ".xml" else harness.check_wbxml
        check(path.read_bytes())
