"""Count the calls that make a GPU step wait on the host, on any device.

On a GPU, reading a device tensor's value on the host (`.item()`, `.tolist()`, `int(t)`,
`bool(t)`, `.cpu()`, `.nonzero()`, indexing with a boolean mask) blocks until the stream has
drained to that point: the host can no longer queue work ahead. A CPU run hides the cost but
makes the same calls, so counting them through `__torch_function__` tells, on CPU, how often
the step would drain the stream on a GPU. (Host-to-device copies of pageable memory also
block; they are not counted here: on CPU source and target are the same.)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy", "nonzero",
         "masked_select", "unique", "unique_consecutive", "argwhere", "__array__"}
"""Tensor methods and torch functions whose result needs the value on the host."""


class HostSyncCounter(TorchFunctionMode):
    """Counts host reads of tensor values, by `bucket` (set by the caller around regions)."""

    def __init__(self):
        super().__init__()
        self.bucket = "other"
        self.counts: Counter = Counter()
        self.where: Counter = Counter()
        """(bucket, function, caller file:line): to say which call it was when a bound fails."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name == "__getitem__" and _bool_index(args)):
            self.counts[self.bucket] += 1
            self.where[(self.bucket, name, _caller())] += 1
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _caller() -> str:
    import traceback

    for frame in reversed(traceback.extract_stack(limit=12)[:-3]):
        if "/torch/" not in frame.filename and "host_syncs" not in frame.filename:
            return f"{frame.filename.split('/')[-1]}:{frame.lineno}"
    return "?"
