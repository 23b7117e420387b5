import pytest


@pytest.fixture
def tiny_config():
    """A config dict that trains in about a second."""
    return {
        "name": "tiny",
        "seed": 3,
        "data": {"source": "synthetic",
                 "synthetic": {"rows": 3000, "dim": 8, "sparse_features": 2, "task_types": ["binary", "regression"]}},
        "model": {"name": "ple", "expert_hidden": [16], "tower_hidden": [8]},
        "train": {"epochs": 3, "batch_size": 128, "lr": 0.01, "progress": False},
    }
