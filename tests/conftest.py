import pytest
import torch


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


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): tiny models on a few hundred rows run
    faster so, and do not fight the other processes of a shared machine for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
