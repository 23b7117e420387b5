"""precision: auto picks bf16 only where the hardware has it; bf16 where it is emulated warns once."""

import warnings

import pytest
import torch

from mtlrec.config import load_config
from mtlrec.experiment import run_experiment
from mtlrec.train import precision


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())


def test_auto_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve_precision("auto", cpu) == "fp32"
    assert precision.resolve_precision("fp32", cpu) == "fp32"


def test_bf16_where_emulated_warns_once_and_is_honoured(monkeypatch, fresh_warnings):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with pytest.warns(RuntimeWarning, match="emulated and much slower"):
        assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # no second warning


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not precision.native_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.native_bf16(torch.device("cpu"))


def test_a_run_with_auto_on_a_cpu_without_bf16_equals_fp32(tiny_config, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    raw = tiny_config | {"train": tiny_config["train"] | {"epochs": 1}}
    auto = run_experiment(load_config(raw | {"train": raw["train"] | {"precision": "auto"}}))
    fp32 = run_experiment(load_config(raw))
    assert auto.test_metrics == fp32.test_metrics


def test_a_model_trained_in_bf16_predicts_in_bf16(tiny_config, monkeypatch, fresh_warnings):
    """TrainedModel.predict (and so evaluate, rank and serve's torch backend) runs in the
    precision the model was trained in: bf16 predictions differ from the same weights in fp32
    by bf16 rounding, not more."""
    import mtlrec
    from mtlrec.experiment import load_splits

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # auto: bf16 here, for the test
    raw = tiny_config | {"train": tiny_config["train"] | {"epochs": 1, "precision": "auto"}}
    result = run_experiment(load_config(raw))
    table = load_splits(result.trained.config).test
    bf16 = result.trained.predict(table)
    fp32 = mtlrec.TrainedModel(result.trained.config.model_copy(
        update={"train": result.trained.config.train.model_copy(update={"precision": "fp32"})}),
        result.trained.encoder, result.trained.model).predict(table)
    difference = (bf16 - fp32).abs().to_numpy()
    assert difference.max() > 0  # the autocast ran
    assert difference.max() < 0.05 * fp32.abs().to_numpy().max() + 0.05
