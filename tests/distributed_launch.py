"""Run a command that starts ranks (the ranks themselves, ``torchrun``, ``accelerate launch``) with a deadline; a run
that does not end by it fails with every still-running process's Python stacks, never waits silently.

The processes run the kernels under Triton's interpreter, with heuristic launch configurations (no tuning) and no
hub kernels, and import ``sloth_core`` from this tree. Each one that registered ``faulthandler`` for ``SIGUSR1``
(the test worker and the examples do) prints its threads' stacks to stderr when the deadline passes; then the whole
process group is killed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def rank_env(**extra: str) -> dict:
    """A rank's environment: CPU ranks with kernels under Triton's interpreter and no GPU visible (on a GPU machine
    too: a rank that saw one would put its model there, or NCCL would find two ranks on one GPU), unless ``extra``
    turns the interpreter off (the GPU tests)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "SLOTH_CORE_AUTOTUNE": "0", "USE_HUB_KERNELS": "NO",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", **extra}
    if env["TRITON_INTERPRET"] == "1":
        env["CUDA_VISIBLE_DEVICES"] = ""
    for name in ("PYTEST_CURRENT_TEST", "PYTEST_VERSION"):
        env.pop(name, None)
    return env


def _descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively (Linux ``/proc``; empty elsewhere)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if not children.exists():
        return []
    found = []
    for child in children.read_text().split():
        found += [int(child), *_descendants(int(child))]
    return found


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def run(commands: list[list[str]], envs: list[dict], logs: Path, timeout: float) -> list[str]:
    """Start every command (one per rank, or one launcher) in its own process group; wait until all exit, at most
    ``timeout`` seconds. Returns their outputs (stdout and stderr together); fails the test on a non-zero exit or
    at the deadline, with the outputs -- at the deadline after asking every process still alive for its stacks."""
    logs.mkdir(parents=True, exist_ok=True)
    files = [open(logs / f"proc{i}.log", "w+") for i in range(len(commands))]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
             for cmd, env, f in zip(commands, envs, files)]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):  # one failed: the others would wait for it
                break
            time.sleep(0.2)
        hung = [p for p in procs if p.poll() is None]
        if hung and time.monotonic() >= deadline:
            for p in hung:
                for pid in [p.pid, *_descendants(p.pid)]:
                    try:
                        os.kill(pid, signal.SIGUSR1)
                    except ProcessLookupError:
                        pass
            time.sleep(2.0)
    finally:
        _kill(procs)
    outputs = []
    for f in files:
        f.seek(0)
        outputs.append(f.read())
        f.close()
    text = "\n".join(f"----- process {i} (exit {p.returncode}): {' '.join(cmd)}\n{out[-6000:]}"
                     for i, (p, cmd, out) in enumerate(zip(procs, commands, outputs)))
    if hung and time.monotonic() >= deadline:
        pytest.fail(f"ranks still running after {timeout:.0f} s; their stacks:\n{text}", pytrace=False)
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"a process failed:\n{text}", pytrace=False)
    return outputs
