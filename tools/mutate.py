"""Mutation testing of the service and API layers (issue 18): ``make mutate`` runs this.

For each listed module, mutmut (3.x) mutates that module alone and runs only the narrow test
files that should catch a bug in it; the score goes to ``tests/MUTATION.md`` (the table between
the ``<!-- scores -->`` marks) and every surviving mutant's diff to
``<workdir>/<slug>/survivors.txt``.

Why a copy of the tree per module: mutmut writes its mutants into ``./mutants`` next to the
configuration it reads, and other work goes on in this tree at the same time, so each module
gets its own directory (default ``/tmp/dmengine-mutate/<slug>``) holding ``dmengine/`` with its
compiled ``.so`` files, ``tests/`` and a ``setup.cfg`` naming the module and its tests.
mutmut imports the mutated package from there (it puts ``mutants/`` first on ``sys.path``;
the editable install's finder comes after the path finder).

Limits of the tool, said here once: mutmut does not mutate decorated functions (the aiohttp
route handlers in ``wsi/``: ``@routes.post(...)``), nor module-level constants; those handlers
are covered by the hand-applied mutants of ``tests/test_mut_*.py``.

Usage: ``python tools/mutate.py [MODULE ...]`` (default: every listed module), ``--list``,
``--max-children N`` (default 2), ``--test-timeout S`` (default 120), ``--mutant-timeout S``
(default 20), ``--again`` (only what the last run did not kill, with today's tests),
``--workdir DIR``, ``--no-table`` (do not touch MUTATION.md).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MUTATION_MD = ROOT / "tests" / "MUTATION.md"
SHARED = pathlib.Path(os.environ.get("DMENGINE_SHARED", ROOT.parent / "shared"))

# module -> the test files that should kill its mutants (narrow: the whole suite is ~5 min of
# both cores and mutmut runs the tests that cover a function once per mutant of it)
_API = ["tests/test_api_routes.py", "tests/test_api_auth.py", "tests/test_security_api.py",
        "tests/test_devices_api.py", "tests/test_mut_api.py"]
MODULES: dict[str, list[str]] = {
    "dmengine/auth.py": ["tests/test_auth.py", "tests/test_mut_auth.py"],
    "dmengine/devices.py": ["tests/test_devices_api.py", "tests/test_mut_policy.py",
                            "tests/test_mut_devices.py"],
    "dmengine/content.py": ["tests/test_content.py", "tests/test_mut_content.py"],
    "dmengine/tasks.py": ["tests/test_mut_tasks.py", "tests/test_broker_e2e.py",
                          "tests/test_mut_fumo.py"],
    "dmengine/commands.py": ["tests/test_mut_commands.py", "tests/test_broker_templates.py",
                             "tests/test_broker_e2e.py"],
    # (not test_broker_e2e.py: a mutant that stalls a task makes each of its tests wait out
    # its 15 s wait_state, and sessions.py has 1,164 mutants; its unit tests drive every hook)
    "dmengine/sessions.py": ["tests/test_mut_sessions.py", "tests/test_mut_fumo.py",
                             "tests/test_mut_policy.py"],
    # scheduler and bulk: their in-process tests (memory store, a clock the test moves; each
    # takes milliseconds).  The end-to-end job tests (test_jobs.py: 25 s, one of them 18 s)
    # made a mutant cost ~10 s, the scheduler's 1,030 about three hours on the shared cores.
    "dmengine/scheduler.py": ["tests/test_mut_scheduler.py", "tests/test_scheduler_recovery.py",
                              "tests/test_alert_followup.py"],
    "dmengine/bulk.py": ["tests/test_mut_bulk.py"],
    # wsi/: test_mut_wsi.py, one engine for the module and a few requests a test (a mutant
    # costs seconds).  With the API suite (_API, test_jobs_api.py, test_webhooks.py: each test
    # its own engine, ~30 s a file) every mutant that survives runs all of it: guard() alone
    # is covered by ~110 tests.  Those files still run in `make test`.
    "dmengine/wsi/security.py": ["tests/test_mut_wsi.py"],
    "dmengine/wsi/middleware.py": ["tests/test_mut_wsi.py"],
    "dmengine/wsi/common.py": ["tests/test_mut_wsi.py"],
    "dmengine/wsi/schemas.py": ["tests/test_mut_wsi.py"],
    "dmengine/wsi/jobs.py": ["tests/test_mut_wsi.py"],
    "dmengine/wsi/subscriptions.py": ["tests/test_mut_wsi.py"],
}

TARGET = 0.85
# Copied next to the mutants: what the tests read besides the package (bench results, fuzz
# seeds, the README and SECURITY.md tables, tools/ for the generated token table …).
ALSO_COPY = ["bench", "fuzz", "tools", "README.md", "SECURITY.md", "setup.py"]


def slug(module: str) -> str:
    return module.removeprefix("dmengine/").removesuffix(".py").replace("/", "_")


def mutmut_requirement() -> str:
    """The pinned mutmut of pyproject's ``mutate`` extra (one place says which version)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (req,) = [r for r in extras["mutate"] if r.startswith("mutmut")]
    return req


def ensure_mutmut() -> None:
    req = mutmut_requirement()
    want = req.split("==", 1)[1] if "==" in req else None
    try:
        from importlib.metadata import version
        if want is None or version("mutmut") == want:
            return
    except Exception:  # not installed
        pass
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", req], check=True)


def prepare(module: str, tests: list[str], work: pathlib.Path, test_timeout: float,
            mutant_timeout: float) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.html", "*.c")
    shutil.copytree(ROOT / "dmengine", work / "dmengine", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
    missing = [t for t in tests if not (ROOT / t).is_file()]
    if missing:
        raise SystemExit(f"{module}: test files not found: {missing}")
    lines = ["[mutmut]", "source_paths = dmengine", f"only_mutate = {module}",
             "pytest_add_cli_args_test_selection ="]
    lines += [f"    {t}" for t in tests]
    # -p no:cacheprovider: no .pytest_cache races between the forked children.
    # --timeout (pytest-timeout, per test): mutmut's own per-mutant limit (below) does not
    # cover its coverage run nor its "forced fail" run (every function made to raise), where a
    # test whose server waits for ever hung the whole run (wsi/security.py); a test that
    # blocks fails after test_timeout s instead, and pytest's -x ends that run there.
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider",
              f"    --timeout={test_timeout:g}",
              "also_copy ="] + [f"    {p}" for p in ALSO_COPY]
    # per mutant: ended as a timeout after (the covering tests' time + mutant_timeout s) x 5
    # of wall time (twice that of CPU).  A mutant that loops for ever (a paging loop whose
    # cursor never ends) costs that whole limit: modules whose tests take milliseconds run
    # with a smaller constant (--mutant-timeout)
    lines += ["timeout_multiplier = 5.0", f"timeout_constant = {mutant_timeout:g}", ""]
    (work / "setup.cfg").write_text("\n".join(lines))
    for p in ALSO_COPY:
        src = ROOT / p
        if src.is_dir():
            shutil.copytree(src, work / p, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, work / p)


def tally(work: pathlib.Path, module: str) -> dict[str, int]:
    from mutmut.stats import status_by_exit_code  # the tool's own reading of exit codes
    meta = json.loads((work / "mutants" / (module + ".meta")).read_text())
    counts: dict[str, int] = {}
    survivors = []
    for key, code in meta["exit_code_by_key"].items():
        st = status_by_exit_code[code]
        counts[st] = counts.get(st, 0) + 1
        if st not in ("killed", "caught by type check"):
            survivors.append((key, st))
    # one parse of the mutated module for every diff (`mutmut show` per mutant re-reads it:
    # ~1 s each)
    r = subprocess.run([sys.executable, "-c", _DIFFS, str(work / "mutants" / module),
                        json.dumps(sorted(survivors))], cwd=work, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{module}: could not write the survivors' diffs:\n{r.stderr[-2000:]}")
    (work / "survivors.txt").write_text(r.stdout)
    return counts


_DIFFS = """
import json, sys
from difflib import unified_diff
import libcst as cst
from mutmut.mutation.diff_apply import read_mutant_function, read_original_function
path, survivors = sys.argv[1], json.loads(sys.argv[2])
module = cst.parse_module(open(path).read())
for key, status in survivors:
    a, b = (cst.Module([f]).code.strip().split("\\n") for f in
            (read_original_function(module, key), read_mutant_function(module, key)))
    print(f"### {key} ({status})")
    print("\\n".join(unified_diff(a, b, lineterm="", n=1)))
    print()
"""


def again_names(work: pathlib.Path, module: str) -> list[str]:
    """The mutants of the last run in ``work`` that survived or had no test, for ``--again``
    (not the timeouts: each would cost its whole time limit again)."""
    from mutmut.stats import status_by_exit_code
    meta = json.loads((work / "mutants" / (module + ".meta")).read_text())
    return sorted(k for k, code in meta["exit_code_by_key"].items()
                  if status_by_exit_code[code] not in ("killed", "caught by type check",
                                                       "timeout"))


def run_module(module: str, base: pathlib.Path, max_children: int,
               test_timeout: float = 120.0, mutant_timeout: float = 20.0,
               again: bool = False) -> dict[str, object]:
    tests = MODULES[module]
    work = base / slug(module)
    names: list[str] = []
    spent = 0.0
    if again:
        # --again: the mutants the last run left, run again with the tests as they are now
        # (mutmut keeps every other result; it collects coverage for the new tests itself).
        # A test only added since cannot revive a killed mutant, so the score is the whole
        # module's; the minutes are both runs'.
        if not (work / "mutants" / (module + ".meta")).is_file():
            raise SystemExit(f"{module}: no earlier run in {work} for --again")
        names = again_names(work, module)
        shutil.copytree(ROOT / "tests", work / "tests", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        spent = json.loads((work / "run.json").read_text())["seconds"]
    else:
        prepare(module, tests, work, test_timeout, mutant_timeout)
    env = dict(os.environ, DMENGINE_SHARED=str(SHARED), PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    log = open(work / "mutmut.log", "w")
    r = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children),
                        *names], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    if r.returncode != 0:
        tail = (work / "mutmut.log").read_text()[-3000:]
        raise SystemExit(f"{module}: mutmut run failed ({r.returncode}):\n{tail}")
    counts = tally(work, module)
    total = sum(counts.values())
    killed = counts.get("killed", 0) + counts.get("caught by type check", 0)
    seconds = round(spent + time.monotonic() - t0)
    (work / "run.json").write_text(json.dumps({"seconds": seconds}))
    return {"module": module, "tests": tests, "counts": counts, "total": total,
            "killed": killed, "score": killed / total if total else 1.0,
            "seconds": seconds, "survivors": str(work / "survivors.txt"),
            "when": time.strftime("%Y-%m-%d")}


def write_table(results: list[dict[str, object]]) -> None:
    """Replaces the rows of the modules just run in MUTATION.md's score table."""
    text = MUTATION_MD.read_text() if MUTATION_MD.exists() else "<!-- scores -->\n<!-- /scores -->\n"
    m = re.search(r"<!-- scores -->\n(.*?)<!-- /scores -->", text, re.S)
    if m is None:
        raise SystemExit(f"{MUTATION_MD}: no <!-- scores --> … <!-- /scores --> block")
    head = ("| module | mutants | killed | survived | timeout | other | score | run on | minutes |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    rows: dict[str, str] = {}
    for line in m.group(1).splitlines():
        cells = line.split("|")
        if len(cells) > 2 and cells[1].strip().startswith("`dmengine/"):
            rows[cells[1].strip().strip("`")] = line
    for r in results:
        c: dict[str, int] = r["counts"]  # type: ignore[assignment]
        other = r["total"] - r["killed"] - c.get("survived", 0) - c.get("timeout", 0)  # type: ignore[operator]
        mark = "" if r["score"] >= TARGET else " ✗"  # type: ignore[operator]
        rows[str(r["module"])] = (f"| `{r['module']}` | {r['total']} | {r['killed']} | "
                                  f"{c.get('survived', 0)} | {c.get('timeout', 0)} | {other} | "
                                  f"{100 * r['score']:.1f} %{mark} | {r['when']} | "  # type: ignore[operator]
                                  f"{int(r['seconds']) / 60:.1f} |")  # type: ignore[call-overload]
    body = head + "\n".join(rows[k] for k in MODULES if k in rows) + "\n"
    MUTATION_MD.write_text(text[:m.start(1)] + body + text[m.end(1):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="dmengine/… paths (default: every listed module)")
    ap.add_argument("--list", action="store_true", help="print the modules and their tests")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--workdir", default=os.environ.get("DMENGINE_MUTATE_DIR", "/tmp/dmengine-mutate"))
    ap.add_argument("--test-timeout", type=float, default=120.0,
                    help="seconds one test may take before it fails (pytest-timeout)")
    ap.add_argument("--mutant-timeout", type=float, default=20.0,
                    help="seconds added to a mutant's expected test time before x5 makes "
                         "its time limit")
    ap.add_argument("--again", action="store_true",
                    help="run only the mutants the last run in --workdir did not kill, with "
                         "the tests as they are now")
    ap.add_argument("--no-table", action="store_true", help="leave tests/MUTATION.md alone")
    a = ap.parse_args(argv)
    if a.list:
        for mod, tests in MODULES.items():
            print(mod, " ".join(tests))
        return 0
    mods = a.modules or list(MODULES)
    unknown = [m for m in mods if m not in MODULES]
    if unknown:
        raise SystemExit(f"not a listed module: {unknown} (see --list)")
    if not SHARED.is_dir():
        raise SystemExit(f"../shared not found at {SHARED} (set DMENGINE_SHARED): the tests need it")
    ensure_mutmut()
    results = []
    below = []
    for mod in mods:
        r = run_module(mod, pathlib.Path(a.workdir), a.max_children, a.test_timeout,
                       a.mutant_timeout, a.again)
        results.append(r)
        print(f"{mod}: {r['killed']}/{r['total']} killed ({100 * r['score']:.1f} %), "  # type: ignore[operator]
              f"{r['counts']}, {r['seconds']} s; survivors: {r['survivors']}", flush=True)
        if r["score"] < TARGET:  # type: ignore[operator]
            below.append(mod)
        if not a.no_table:
            write_table(results)
    if below:
        print(f"below {TARGET:.0%} killed: {', '.join(below)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
