"""Marks shared by several test files."""
import os

import pytest

#: A benchmark's CPU smoke mode (``--tiny``) runs its kernels under Triton's interpreter, which a process on a GPU
#: machine did not start with (its kernels were compiled for the GPU at import): it runs where the interpreter is on.
interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="a CPU smoke mode: needs a process started under Triton's interpreter")
