"""A cause of distributed runs that hang with no output (issue 22's first attempt hung until a 900 s timeout): ranks
started with ``multiprocessing``'s ``fork`` after the parent process ran a parallel CPU operation. The children
inherit the parent's OpenMP thread-pool state without its threads and wait forever in their first parallel region
-- before any collective, so no timeout of torch.distributed fires, and nothing is printed. Fresh processes
(``torchrun``, ``accelerate launch``, ``multiprocessing`` with ``spawn``, ``subprocess``) do not hang; neither do
forked ones whose parent never ran a parallel operation. sloth_core plays no part (it is not imported here).

    python benchmarks/diag_fork_hang.py     # prints, per start method, whether the 2 ranks finished in 20 s

Output on the 2-core CPU machine, torch 2.13.0+cpu, 2026-12-06:
    fork after a parallel op in the parent: ranks finished: [False, False]
    spawn after a parallel op in the parent: ranks finished: [True, True]
"""
import multiprocessing as mp
import os
import tempfile

import torch


def rank(r: int, store: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=r, world_size=2)
    x = torch.randn(512, 512)
    x @ x  # the first parallel region: a forked child waits here forever
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()


def main() -> None:
    a = torch.randn(1024, 1024)
    a @ a  # the parent starts its OpenMP thread pool
    for method in ("fork", "spawn"):
        store = os.path.join(tempfile.mkdtemp(), "store")
        procs = [mp.get_context(method).Process(target=rank, args=(r, store)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(20)
        print(f"{method} after a parallel op in the parent: ranks finished: {[p.exitcode == 0 for p in procs]}")
        for p in procs:
            if p.is_alive():
                p.kill()


if __name__ == "__main__":
    main()
