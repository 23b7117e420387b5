"""The `Example:` blocks in the docstrings run, and print what they say they print."""

import doctest
import importlib

import pytest

MODULES = [
    "mtlrec.tasks", "mtlrec.models.registry", "mtlrec.models.base", "mtlrec.models.options",
    "mtlrec.nn.experts", "mtlrec.nn.embedding", "mtlrec.train.gradients", "mtlrec.train.early_stopping",
    "mtlrec.train.evaluation", "mtlrec.folders", "mtlrec.models.dselect_k", "mtlrec.models.pepnet",
    "mtlrec.models.stem", "mtlrec.models.ml_mmoe", "mtlrec.models.dbmtl", "mtlrec.models.home", "mtlrec.models.snr",
    "mtlrec.nn.routing", "mtlrec.data.splits", "mtlrec.analysis.paired",
    "mtlrec.train.metrics",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
