"""ESMM, the Entire Space Multi-task Model (Ma et al., SIGIR 2018).

Conversion is only observed after a click, so a CVR model trained on clicked rows alone
sees a biased sample. ESMM learns pCVR through a product over the entire impression space:
    pCTR = sigmoid(l_ctr),  pCVR = sigmoid(l_cvr),  pCTCVR = pCTR * pCVR,
with losses on CTR (label: click) and CTCVR (label: click and conversion) over all
impressions. pCVR gets no loss of its own and is reported at predict time as `cvr`.
"""

from __future__ import annotations

import torch

from mtlrec.data.features import Features
from mtlrec.models.base import Backbone, ModelOutput, MultiTaskModel
from mtlrec.models.options import MLPOptions
from mtlrec.models.registry import register_model
from mtlrec.models.separate import SeparateBottoms
from mtlrec.schema import Schema
from mtlrec.tasks import kind_of, product_logit


@register_model("esmm", MLPOptions, "pCTCVR = pCTR x pCVR over the entire impression space (Ma et al. 2018)",
                backbone=SeparateBottoms)
class ESMM(MultiTaskModel):
    """Tasks, in this order: CTR (label: click) and CTCVR (label: 1 if clicked and converted),
    both binary and labelled on every impression. Logits `[B, 2]` are CTR's and CTCVR's (the
    logit of pCTR * pCVR, so the shared losses and metrics apply unchanged); `extra_logits`
    holds `cvr` `[B]`.

    Options: those of the backbone (one MLP per task over the shared embedding, as in the
    paper) and the towers.
    """

    def __init__(self, schema: Schema, backbone: type[Backbone], options: MLPOptions):
        if len(schema.tasks) != 2 or not all(kind_of(t.type).probability for t in schema.tasks):
            raise ValueError("esmm needs exactly two binary tasks, in order: click (CTR), then "
                             "click-and-convert (CTCVR), both labelled on every impression")
        if any(t.space for t in schema.tasks):
            raise ValueError("esmm trains both tasks on the entire impression space: remove the tasks' space")
        super().__init__(schema, backbone, options)

    def forward(self, features: Features) -> ModelOutput:
        out = self.backbone(self.inputs(features))  # its backbone has no penalty
        ctr, cvr = self.tower_logits(out.task_reps).unbind(1)
        logits = torch.stack([ctr, product_logit(ctr, cvr)], dim=1)
        return ModelOutput(logits, out.gates, {"cvr": cvr}, representation=out.representation)  # Z: the input x
