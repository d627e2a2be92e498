"""The layer arrows of DESIGN.md §2 point down: a module imports only from its layer or below.

Imports are read from the source (.py and .pyx: Python imports and Cython cimports) with the
ast module / a line scan, so the check needs no import side effects.
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "dmengine"

# module (dotted, relative to dmengine) -> layer; a package entry covers its submodules.
LAYERS: dict[str, int] = {
    "status": 0, "errors": 0, "logs": 0, "bounded": 0, "_tokens": 0, "uri": 0, "model": 0, "message": 0, "_message": 0,
    "_decimal": 0,
    "_wbxml": 1, "_xml": 1, "xmlcodec": 1, "codec": 1,
    "_events": 0, "events": 2, "_account": 2, "auth": 2, "_session": 2,
    "server": 3, "_devport": 3, "_dmcore": 3, "store": 3, "notify": 3, "metrics": 3, "_metrics": 3,
    "authguard": 3, "supervised": 3, "urlguard": 3,
    "broker": 4, "tasks": 4, "commands": 4, "sessions": 4, "config": 4, "bulk": 4, "devices": 4, "content": 4, "scheduler": 4, "webhooks": 4,
    "charging": 4, "bootstrap": 4, "identity": 4,
    "wsi": 5,
    "__main__": 6, "cli": 6, "client": 6, "jobs_cli": 6, "keys_cli": 6, "engine": 6, "devprocs": 6, "simulator": 6, "__init__": 6,
}


def layer_of(mod: str) -> int | None:
    parts = mod.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key]
    return None


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


_CIMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+cimport|cimport\s+([\w.]+))", re.M)


def imports_of(path: pathlib.Path, mod: str) -> set[str]:
    """dmengine modules imported by ``path`` (dotted, relative to dmengine)."""
    text = path.read_text()
    found: set[str] = set()
    pkg_parts = mod.split(".")[:-1] if not path.name == "__init__.py" else mod.split(".")
    if path.suffix == ".pyx":
        for m in _CIMPORT.finditer(text):
            name = m.group(1) or m.group(2)
            if name.startswith("dmengine."):
                found.add(name[len("dmengine."):])
        # Python-level imports in .pyx: a line scan (Cython syntax is not Python's)
        for m in re.finditer(r"^\s*from\s+(\.+[\w.]*|dmengine[\w.]*)\s+import\s+([\w, ]+)", text,
                             re.M):
            found |= _resolve(m.group(1), [n.strip() for n in m.group(2).split(",")], pkg_parts)
        for m in re.finditer(r"^\s*import\s+(dmengine\.[\w.]+)", text, re.M):
            found.add(m.group(1)[len("dmengine."):])
        return found
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dmengine."):
                    found.add(a.name[len("dmengine."):])
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found |= _resolve(base, [a.name for a in node.names], pkg_parts)
    return found


def _resolve(base: str, names: list[str], pkg_parts: list[str]) -> set[str]:
    if base.startswith("dmengine"):
        rest = base[len("dmengine"):].lstrip(".")
        return {f"{rest}.{n}".strip(".") if not rest else rest for n in names} if rest else \
            set(names)
    if not base.startswith("."):
        return set()
    level = len(base) - len(base.lstrip("."))
    anchor = pkg_parts[: len(pkg_parts) - (level - 1)] if level > 1 else pkg_parts
    rest = base.lstrip(".")
    if rest:
        return {".".join(anchor + [rest])}
    return {".".join(anchor + [n]) for n in names}


SOURCES = sorted(p for p in PKG.rglob("*") if p.suffix in (".py", ".pyx"))


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in SOURCES if layer_of(module_name(p)) is None]
    assert not missing, f"add these modules to LAYERS (DESIGN.md §2): {missing}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    mod = module_name(path)
    own = layer_of(mod)
    assert own is not None
    if path.name == "__init__.py" and "." not in mod and mod == "__init__":
        return
    bad = []
    for dep in imports_of(path, mod):
        lay = layer_of(dep)
        if lay is not None and lay > own:
            bad.append(f"{dep} (L{lay})")
    assert not bad, f"{mod} (L{own}) imports from higher layers: {bad}"


def test_every_cython_module_has_a_stub():
    for pyx in PKG.rglob("*.pyx"):
        assert pyx.with_suffix(".pyi").exists(), f"{pyx.name} has no .pyi stub"


def test_the_checker_sees_a_violation(tmp_path):
    """The check itself can fail: a store module importing the broker is caught."""
    fake = PKG / "store" / "base.py"
    deps = imports_of(fake, "store.base")
    assert "model" in deps
    src = tmp_path / "x.py"
    src.write_text("from ..broker import Broker\n")
    assert _resolve("..broker", ["Broker"], ["store"]) == {"broker"}
    assert layer_of("broker") > layer_of("store.base")
