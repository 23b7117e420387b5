"""The model zoo: `create("ple", schema, **options)`, `list_models()`, `model_options(name)`.

Every model takes sparse ids `[B, S]` and dense values `[B, D]` and returns
`ModelOutput(logits [B, T], gates)`. A model registers itself beside its class with its typed
options (`mtlrec.models.registry`); the modules below are imported here so that they do, in
the order `mtlrec models` lists them. A new model is a new module named in that line.
"""

from mtlrec.models import (  # noqa: F401  (registers)
    shared_bottom, separate, cross_stitch, snr, moe, ml_mmoe, dselect_k, ple, home, esmm, aitm, dbmtl,
    pepnet, stem,
)
from mtlrec.models.base import Backbone, BackboneOutput, ModelOutput, MultiTaskModel, SingleTaskModels
from mtlrec.models.options import ExpertOptions, MLPOptions, ModelOptions
from mtlrec.models.registry import ModelSpec, check_options, create, list_models, model_options, register_model, spec

__all__ = [
    "Backbone", "BackboneOutput", "ExpertOptions", "MLPOptions", "ModelOptions", "ModelOutput", "ModelSpec",
    "MultiTaskModel", "SingleTaskModels", "check_options", "create", "list_models", "model_options",
    "register_model", "spec",
]
