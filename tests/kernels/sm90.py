"""Compiling kernels for an H100/H200 (sm_90) target on a machine without a GPU: Triton ships ptxas, so a fresh
process without the interpreter can run ``triton.compile`` and catch what the interpreter accepts but the compiler
rejects (types across branches, loop-carried scalars, ...)."""
import os
import subprocess
import sys
from pathlib import Path


def run_compile_script(script: str, timeout: int = 300) -> None:
    """Run ``script`` in a fresh interpreter-free process; it must print ``compiled``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
