"""Fault injection for the fault-tolerance tests: SAT_DIST_FAULT=<what>@<iteration>.

  kill-after-state-file@N   rank 0 SIGKILLs itself in the save of iteration N, after writing
                            its state file and before the manifest (a save cut in half)
  kill-during-prune@N       rank 0 SIGKILLs itself while --keep-latest-k removes iter_N: after
                            renaming it to .deleting-iter_N, before deleting its files
  sigusr1@N                 rank 0 sends itself SIGUSR1 after step N (a preemption notice
                            that reaches one rank only)

Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist


def fault_point(what: str, iteration: int) -> None:
    spec = os.environ.get("SAT_DIST_FAULT")
    if not spec or spec != f"{what}@{iteration}" or (dist.is_initialized() and dist.get_rank() != 0):
        return
    if what in ("kill-after-state-file", "kill-during-prune"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "sigusr1":
        os.kill(os.getpid(), signal.SIGUSR1)
