"""Per-task losses over each task's sample space, and how they are weighted into one."""

from mtlrec.losses.task_losses import task_losses
from mtlrec.losses.weighting import FixedWeighting, create_weighting

__all__ = ["FixedWeighting", "create_weighting", "task_losses"]
