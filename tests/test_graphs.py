"""The CUDA-graph path's parts that run anywhere: which runs can be recorded, the errors and
warnings that say why not, the batch indices a recorded step gathers, the TF32 switch and the
learning-rate rule for large batches. The recorded step itself is checked against the eager
one in tests/test_cuda.py (CUDA only)."""

import math
import warnings

import pytest
import torch
from pydantic import ValidationError

from mtlrec.config import TrainConfig, load_config
from mtlrec.data.tensors import TensorData
from mtlrec.experiment import run_experiment
from mtlrec.train.graphs import GraphedCall, capture_blockers, matmul_precision
from mtlrec.train.optim import make_optimizer

CAPTURABLE = dict(device=torch.device("cuda"), world=1, fused_tables=False, strategy="joint", weighting="fixed",
                  weighting_capturable=True, optimizers=["adam"], lists=False, compile=False, stepped=[])


def test_a_plain_cuda_run_has_no_blocker():
    assert capture_blockers(**CAPTURABLE) == []


@pytest.mark.parametrize("change, named", [
    ({"device": torch.device("cpu")}, "the device is cpu"),
    ({"world": 2}, "data parallel"),
    ({"fused_tables": True}, "fused tables"),
    ({"strategy": "alternating"}, "alternating"),
    ({"weighting": "pcgrad", "weighting_capturable": False}, "'pcgrad'"),
    ({"optimizers": ["adam", "sgd"]}, "optimizer sgd"),
    ({"lists": True}, "multi-valued"),
    ({"compile": True}, "train.compile"),
    ({"stepped": ["Router"]}, "Router"),
])
def test_each_blocker_is_named(change, named):
    blockers = capture_blockers(**(CAPTURABLE | change))
    assert len(blockers) == 1 and named in blockers[0]


def test_only_weightings_that_stay_on_the_device_are_capturable():
    from mtlrec.losses.weighting import WEIGHTINGS

    capturable = {name for name, cls in WEIGHTINGS.items() if cls.capturable}
    assert capturable == {"fixed", "uncertainty", "learnable", "decay"}
    assert not any(WEIGHTINGS[name].needs_task_gradients for name in capturable)


def test_cuda_graph_on_refuses_a_run_it_cannot_record(tiny_config):
    raw = tiny_config | {"train": tiny_config["train"] | {"cuda_graph": "on"}}
    with pytest.raises(ValueError, match="cuda_graph on.*the device is cpu"):
        run_experiment(load_config(raw))


def test_cuda_graph_auto_trains_eagerly_and_says_why(tiny_config, one_thread):
    raw = tiny_config | {"train": tiny_config["train"] | {"epochs": 1}}
    plain = run_experiment(load_config(raw))
    with pytest.warns(RuntimeWarning, match="cuda_graph auto: training eagerly, as the device is cpu"):
        auto = run_experiment(load_config(raw | {"train": raw["train"] | {"cuda_graph": "auto"}}))
    for a, b in zip(plain.trained.model.state_dict().values(), auto.trained.model.state_dict().values()):
        assert torch.equal(a, b)


def test_batch_indices_are_the_shuffled_batches(one_thread):
    n = 10
    data = TensorData(torch.arange(n).view(n, 1), torch.randn(n, 2), torch.randn(n, 1), torch.ones(n, 1, dtype=bool))
    batches = list(data.batches(4, torch.Generator().manual_seed(5)))
    indices = list(data.batch_indices(4, torch.Generator().manual_seed(5)))
    assert [len(i) for i in indices] == [4, 4, 2]
    assert sorted(torch.cat(indices).tolist()) == list(range(n))
    for batch, index in zip(batches, indices):
        assert torch.equal(batch.sparse[:, 0], index) and torch.equal(batch.dense, data.dense[index])


def test_a_disabled_graphed_call_is_the_plain_call():
    calls = []
    call = GraphedCall(lambda x: (calls.append(1) or x + 1,), enabled=False)
    for _ in range(6):
        assert call(torch.zeros(2))[0].tolist() == [1.0, 1.0]
    assert len(calls) == 6 and call.replays == 0 and call.graph is None


def test_matmul_precision_sets_tf32_inside_and_restores_after():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with matmul_precision(True):
        assert matmul.fp32_precision == "tf32"
    with matmul_precision(False):
        assert matmul.fp32_precision == "ieee"
    assert matmul.fp32_precision == before


def test_tf32_on_a_cpu_run_warns(tiny_config, one_thread):
    raw = tiny_config | {"train": tiny_config["train"] | {"epochs": 1, "tf32": True}}
    with pytest.warns(RuntimeWarning, match="train.tf32 applies to CUDA"):
        run_experiment(load_config(raw))


def test_only_adam_steps_inside_a_graph():
    with pytest.raises(ValueError, match="'sgd' cannot step inside a CUDA graph"):
        make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], 0.1, 0.0, fused=False, capturable=True)


# ------------------------------------------------------------------ lr rule for large batches
@pytest.mark.parametrize("rule, factor", [("linear", 8.0), ("sqrt", math.sqrt(8.0))])
def test_lr_scaling_multiplies_every_lr_by_the_rule(rule, factor):
    config = TrainConfig(batch_size=8192, lr=0.001, lr_scaling=rule, lr_reference_batch=1024,
                         optimizers=[{"params": "embedding", "lr": 0.05}, {"params": "rest"}])
    from mtlrec.train.schedules import group_schedules

    assert [g.lr for g in group_schedules(config)] == pytest.approx([0.05 * factor, 0.001 * factor])
    assert config.scaled_lr(0.001) == pytest.approx(0.001 * factor)


def test_lr_scaling_needs_its_reference_batch_and_the_other_way_round():
    with pytest.raises(ValidationError, match="lr_scaling and train.lr_reference_batch go together"):
        TrainConfig(lr_scaling="sqrt")
    with pytest.raises(ValidationError, match="go together"):
        TrainConfig(lr_reference_batch=1024)
    assert TrainConfig(batch_size=256).scaled_lr(0.01) == 0.01  # no rule: the lr as given


def test_the_scaled_lr_is_what_the_optimizer_steps_with(tiny_config, one_thread):
    raw = tiny_config | {"train": tiny_config["train"] | {"epochs": 1, "batch_size": 512, "lr": 0.01,
                                                          "lr_scaling": "sqrt", "lr_reference_batch": 128}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run_experiment(load_config(raw))
    assert result.history[0]["lr/all"] == pytest.approx(0.02)


def test_the_recorded_paths_plumbing_trains_and_predicts_as_the_eager_path(tiny_config, one_thread):
    """The path a recorded run takes (each batch an index into the resident rows, gathered
    inside the step; prediction through the recorded forward's call), run without a graph on
    the CPU: the same weights and predictions as the eager path, to the bit."""
    from mtlrec import models
    from mtlrec.experiment import encode_splits
    from mtlrec.train.trainer import Trainer

    config = load_config(tiny_config | {"train": tiny_config["train"] | {"epochs": 2, "clip_grad_norm": 1.0}})
    encoded = encode_splits(config)
    schema = encoded.encoder.schema
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(models.create(config.model.name, schema, **config.model.options), schema, config.train,
                          seed=config.seed)
        trainer.graphed = graphed  # on a CPU: the indices path, each GraphedCall a plain call
        history = trainer.fit(encoded.train, encoded.valid)
        runs.append((trainer, history, trainer.predict_split(encoded.test)[0]))
    (eager, eager_history, eager_logits), (indexed, indexed_history, indexed_logits) = runs
    assert indexed._graphed_update.replays == 0 and indexed._graphed_update.graph is None
    for a, b in zip(eager.model.state_dict().values(), indexed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["train/loss"] for r in eager_history] == [r["train/loss"] for r in indexed_history]
    assert torch.equal(eager_logits, indexed_logits)
