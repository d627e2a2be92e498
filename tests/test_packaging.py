"""pyproject.toml ships every package of dmengine (a wheel built from it has them all)."""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_is_listed():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dmengine").rglob("__init__.py")}
    assert found == listed, f"missing from pyproject.toml: {sorted(found - listed)}"


def test_stubs_and_pxds_travel_with_their_packages():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = conf["package-data"]
    for pyx in (ROOT / "dmengine").rglob("*.pyx"):
        pkg = ".".join(pyx.parent.relative_to(ROOT).parts)
        assert "*.pyi" in data.get(pkg, []), f"{pkg} ships no .pyi stubs ({pyx.name})"
