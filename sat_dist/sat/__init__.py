"""The SAT algorithm, pure: importance scores, unit selection, omission-rate schedules.

Nothing here imports torch.distributed. The model passes a `reduce` callable (identity in
one process, an all-reduce over the data-parallel group when distributed) and a seeded
torch.Generator; that is the whole distributed surface of SAT.
"""

from sat_dist.sat.importance import attention_scores, mlp_scores
from sat_dist.sat.schedule import OmissionSchedule
from sat_dist.sat.selection import keep_count, select_units, selection_generator

__all__ = [
    "attention_scores",
    "mlp_scores",
    "OmissionSchedule",
    "keep_count",
    "select_units",
    "selection_generator",
]
