"""Fixed weights from the config."""

from __future__ import annotations

from mtlrec.losses.weighting.base import Weighting, register_weighting


@register_weighting("fixed")
class Fixed(Weighting):
    """L = sum_k w_k L_k, w_k the tasks' `weight` in the config."""

    capturable = True
