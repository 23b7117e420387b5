"""Per-task losses over each task's sample space, and how they are weighted into gradients."""

from mtlrec.losses.task_losses import task_losses
from mtlrec.losses.weighting import WEIGHTINGS, Weighting, create_weighting, project_conflicts

__all__ = ["WEIGHTINGS", "Weighting", "create_weighting", "project_conflicts", "task_losses"]
