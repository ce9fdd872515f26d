"""Preemption: SIGTERM, SIGUSR1 and SIGINT become a checkpoint at the next step boundary;
a rank whose launcher dies gets SIGTERM (Linux's parent-death signal)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (SLURM's warning before a time limit) ask for a checkpoint at the
    next step boundary. Ranks agree through one all-reduce per step, so a signal that
    reached only some ranks still stops all of them at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
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
        parent = os.getppid()
        self._watched = _ppid_of(parent) if "deepspeed.launcher.launch" in _cmdline(parent) else None
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _launcher_gone(self) -> bool:
        """Under DeepSpeed's launcher the rank's parent is its per-node `launch` process and the
        grandparent the `deepspeed` command; a signal to that command ends it at once and the
        `launch` process lives on, so no parent-death signal comes. Polled each step: the
        parent's parent changed means the `deepspeed` command is gone."""
        if self._watched is None:
            return False
        return _ppid_of(os.getppid()) != self._watched

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether this rank was asked to stop: a signal, or its launcher gone (polled here)."""
        if not self.received and self._launcher_gone():
            self.received = "the deepspeed launcher exited"
        return self.received is not None

    def any_rank(self, device) -> bool:
        self.requested()
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if PreemptionFlag._installed is self:
            PreemptionFlag._installed = None


PR_SET_PDEATHSIG = 1


def term_when_parent_dies() -> bool:
    """Under a launcher (torchrun, deepspeed), ask Linux to send this rank SIGTERM when the
    launcher process dies, so that a launcher killed or signalled by a job manager makes
    every rank save and exit instead of training on orphaned. True if it was set."""
    if not sys.platform.startswith("linux") or "LOCAL_RANK" not in os.environ:
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the launcher died before the request: act now
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid_of(pid: int) -> Optional[int]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
