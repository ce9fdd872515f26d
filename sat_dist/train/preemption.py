"""Preemption: SIGTERM / SIGUSR1 become a checkpoint at the next step boundary."""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (SLURM's warning before a time limit) ask for a checkpoint at the
    next step boundary. Ranks agree through one all-reduce per step, so a signal that
    reached only some ranks still stops all of them at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    _installed: Optional["PreemptionFlag"] = None

    @classmethod
    def install(cls) -> "PreemptionFlag":
        """The process's handler, installed on first call: the entry point calls this first
        thing, so a signal during start-up or resume is kept rather than fatal."""
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed

    def __init__(self):
        self.received: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def any_rank(self, device) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if PreemptionFlag._installed is self:
            PreemptionFlag._installed = None
