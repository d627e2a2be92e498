"""Builds every Cython module under dmengine/.

DMENGINE_DEBUG=1 builds with bounds checks, wraparound checks, line tracing and
an annotated HTML next to each module, for profiling and for hunting memory bugs.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("DMENGINE_DEBUG") == "1"

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}
macros = []
if DEBUG:
    directives.update(linetrace=True, profile=True)
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]

# Types whose objects other modules create by the thousand (``T.__new__(T)`` from another
# module calls ``T->tp_new``): with Cython's vectorcall tp_new that slot is a wrapper that
# re-packs the (empty) arguments for the real constructor, ~50 instructions per object.
PLAIN_TP_NEW = {"dmengine._events", "dmengine._message"}

extensions = []
for path in sorted(glob.glob("dmengine/**/*.pyx", recursive=True)):
    name = path[:-4].replace(os.sep, ".")
    extensions.append(
        Extension(
            name,
            [path],
            define_macros=macros + ([("CYTHON_VECTORCALL_TPNEW", "0")] if name in PLAIN_TP_NEW else []),
            extra_compile_args=["-O0", "-g"] if DEBUG else ["-O2"],
        )
    )

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=DEBUG,
        nthreads=2,
    ),
)
