"""Per-task losses over each task's sample space, and how they are weighted into gradients."""

from mtlrec.losses.task_losses import binary_mask, task_losses, task_weights
from mtlrec.losses.weighting import WEIGHTINGS, Weighting, create_weighting, project_conflicts

__all__ = ["WEIGHTINGS", "Weighting", "binary_mask", "create_weighting", "project_conflicts", "task_losses",
           "task_weights"]
