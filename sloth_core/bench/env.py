"""The environment a benchmark ran in, stored beside its results so two result files can be told apart.

Library versions are read from the installed distributions' metadata (nothing heavy is imported); a library whose
top-level module cannot be found is reported as ``"missing"``. The GPU name comes from torch, the driver version
from ``nvidia-smi``; both are ``"none"`` / ``"unknown"`` on a machine without CUDA.
"""
from __future__ import annotations

import datetime
import importlib.util
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

MISSING = "missing"
UNKNOWN = "unknown"

# report key -> (distribution name, top-level module)
LIBRARIES = {
    "torch": ("torch", "torch"),
    "triton": ("triton", "triton"),
    "transformers": ("transformers", "transformers"),
    "peft": ("peft", "peft"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "liger_kernel": ("liger-kernel", "liger_kernel"),
}
_REPO = Path(__file__).resolve().parents[2]


def library_version(distribution: str, module: str) -> str:
    """The installed version of ``distribution``, or ``"missing"`` when ``module`` cannot be found."""
    try:
        if importlib.util.find_spec(module) is None:
            return MISSING
    except (ImportError, ValueError):
        return MISSING
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    out = done.stdout.strip()
    return out or None


def git_commit() -> str:
    """``git rev-parse HEAD`` of the checkout sloth_core is imported from; ``"unknown"`` when that fails."""
    return _run(["git", "rev-parse", "HEAD"], cwd=_REPO) or UNKNOWN


def git_dirty() -> str:
    """``"yes"`` when tracked files differ from ``git_commit()`` (the figures then belong to uncommitted code),
    ``"no"``, or ``"unknown"`` when git cannot tell."""
    if _run(["git", "rev-parse", "--is-inside-work-tree"], cwd=_REPO) != "true":
        return UNKNOWN
    return "yes" if _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO) else "no"


def gpu_facts() -> dict[str, str]:
    """GPU name, NVIDIA driver version and the CUDA version torch was built with."""
    try:
        import torch
    except ImportError:
        return {"gpu": "none", "driver": UNKNOWN, "cuda": "none"}
    cuda = torch.version.cuda or "none"
    if not torch.cuda.is_available():
        return {"gpu": "none (CUDA unavailable)", "driver": UNKNOWN, "cuda": cuda}
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {"gpu": torch.cuda.get_device_name(torch.cuda.current_device()),
            "driver": driver.splitlines()[0].strip() if driver else UNKNOWN, "cuda": cuda}


def environment() -> dict:
    """Everything that changes a measurement: hardware, driver, library versions, code version, how it was run."""
    import sloth_core

    env = gpu_facts()
    for key, (dist, module) in LIBRARIES.items():
        env[key] = library_version(dist, module)
    env.update(
        sloth_core=sloth_core.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        git_commit=git_commit(),
        git_dirty=git_dirty(),
        command=shlex.join([sys.executable, *sys.argv]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return env
