"""The cffi out-of-line build of dmb's C core (``dmb._ring_cffi``).

setup.py names this module in ``cffi_modules``.  The declarations handed to
cffi are the block of ``_ring.h`` between its cdef markers, so constants and
prototypes are written once, in the header.
"""

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def read_cdef(header=HERE / "_ring.h"):
    """Return the cffi-readable part of the header."""
    text = header.read_text()
    match = re.search(r"/\* cdef-begin \*/(.*?)/\* cdef-end \*/", text, re.S)
    if match is None:
        raise RuntimeError(f"{header} has no cdef-begin/cdef-end block")
    return match.group(1)


ffibuilder = FFI()
ffibuilder.cdef(read_cdef())
ffibuilder.set_source(
    "dmb._ring_cffi",
    '#include "_ring.h"',
    sources=[str((HERE / "_ring.c").relative_to(HERE.parent))],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-std=c11", "-O2"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
