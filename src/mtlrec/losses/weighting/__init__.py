"""Loss weighting: from per-task losses `[T]` to gradients on the model, one method per file.

`create_weighting(spec, tasks)` builds the method a config names; `WEIGHTINGS` lists them.
A new method is one file here with a `Weighting` subclass and `@register_weighting`, named
in the import line below (which sets the order `mtlrec` lists them in).
"""

# each module registers its method; this order is the listing order
# isort: off
from mtlrec.losses.weighting import fixed, uncertainty, learnable, decay, dwa  # noqa: F401  loss weights
from mtlrec.losses.weighting import gradnorm, pcgrad, mgda, cagrad, nash_mtl, imtl  # noqa: F401  gradient methods
from mtlrec.losses.weighting import gradvac, graddrop, aligned_mtl, fairgrad, metabalance, pe_ltr  # noqa: F401
from mtlrec.losses.weighting import rlw, gls, db_mtl, famo, stch  # noqa: F401  loss scalarisations
# isort: on
from mtlrec.losses.weighting.base import (
    WEIGHTINGS,
    Weighting,
    WeightingOptions,
    create_weighting,
    register_weighting,
    split_spec,
)
from mtlrec.losses.weighting.pcgrad import project_conflicts

__all__ = ["WEIGHTINGS", "Weighting", "WeightingOptions", "create_weighting", "project_conflicts",
           "register_weighting", "split_spec"]
