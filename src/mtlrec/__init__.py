"""mtlrec: multi-task learning for recommender systems.

    import mtlrec
    model = mtlrec.fit("config.yaml", train=df)    # or a dict; valid= / test= optional
    model = mtlrec.load("runs/demo/ple")           # a folder written by `mtlrec train`
    model.predict(table)                           # DataFrame, one column per task
"""

from mtlrec.config import Experiment, load_config
from mtlrec.experiment import fit, run_experiment
from mtlrec.schema import DenseFeature, Schema, SparseFeature, Task
from mtlrec.trained import TrainedModel, load

__version__ = "0.1.0"

__all__ = [
    "DenseFeature", "Experiment", "Schema", "SparseFeature", "Task", "TrainedModel", "fit", "load",
    "load_config", "run_experiment",
]
