"""Post-hoc calibration (Platt, isotonic): fits equal scikit-learn's, a miscalibrated model's test
ECE falls, uncalibrated tasks are untouched, and every way of predicting applies it."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from mtlrec.calibration import (EPS, Calibration, IsotonicMap, calibrate, fit_isotonic, fit_platt,
                                isotonic)
from mtlrec.config import load_config
from mtlrec.data.tensors import TensorData
from mtlrec.experiment import load_splits, run_experiment
from mtlrec.export import export_onnx, export_torchscript
from mtlrec.folders import DamagedFolder, write_manifest
from mtlrec.schema import DenseFeature, Schema, Task
from mtlrec.serve import create_app
from mtlrec.train.metrics import expected_calibration_error
from mtlrec.trained import CALIBRATION, TrainedModel, load

TASKS = [{"name": "y1", "type": "focal", "calibration": "platt"},  # focal loss: probabilities pushed to 0.5
         {"name": "y2", "type": "focal", "calibration": "isotonic"},
         {"name": "y3"},  # binary, not calibrated
         {"name": "y4", "type": "regression"}]


def config(tasks=TASKS, model=None):
    return load_config({
        "seed": 3, "tasks": tasks,
        "data": {"synthetic": {"rows": 3000, "dim": 8, "sparse_features": 2,
                               "task_types": ["binary", "binary", "binary", "regression"]}},
        "model": model or {"name": "mmoe", "num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]},
        "train": {"epochs": 3, "batch_size": 128, "lr": 0.01, "progress": False}})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("calibrated") / "model"
    cfg = config()
    result = run_experiment(cfg, folder)
    table = load_splits(cfg).test.head(200).reset_index(drop=True)
    return result, folder, cfg, table


def noisy_logits(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < expit(0.6 * z - 0.4)).astype(float)  # the true map: a = 0.6, b = -0.4
    return z, y, rng


# --------------------------------------------------------------------------- the fits


def test_platt_equals_unregularised_logistic_regression():
    z, y, _ = noisy_logits()
    fitted = fit_platt(z, y)
    reference = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(z[:, None], y)
    assert fitted.a == pytest.approx(reference.coef_[0, 0], abs=1e-5)
    assert fitted.b == pytest.approx(reference.intercept_[0], abs=1e-5)
    assert fitted.a == pytest.approx(0.6, abs=0.1) and fitted.b == pytest.approx(-0.4, abs=0.15)


def test_platt_weights_equal_repeated_rows():
    z, y, rng = noisy_logits(500, seed=1)
    counts = rng.integers(0, 4, len(z))
    weighted = fit_platt(z, y, counts.astype(float))
    repeated = fit_platt(np.repeat(z, counts), np.repeat(y, counts))
    assert weighted.a == pytest.approx(repeated.a, abs=1e-9) and weighted.b == pytest.approx(repeated.b, abs=1e-9)
    assert abs(weighted.a - fit_platt(z, y).a) > 1e-3  # the weights changed the fit


@pytest.mark.parametrize("weighted", [False, True])
def test_isotonic_equals_sklearn_predict_on_fresh_points(weighted):
    z, y, rng = noisy_logits(1500, seed=2)
    w = rng.uniform(0.1, 3, len(z)) if weighted else None
    fitted = fit_isotonic(z, y, w)
    reference = IsotonicRegression(out_of_bounds="clip").fit(expit(z), y, sample_weight=w)
    fresh = np.concatenate([rng.normal(0, 3, 500), [-60.0, -20.0, z.min(), z.max(), 20.0, 60.0]])
    knots = torch.tensor(fitted.x, dtype=torch.float64), torch.tensor(fitted.y, dtype=torch.float64)
    got = torch.sigmoid(isotonic(torch.tensor(fresh), *knots)).numpy()
    expected = np.clip(reference.predict(expit(fresh)), EPS, 1 - EPS)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # outside the validation rows' range: the end knots' values (clipped away from 0 and 1)
    assert got[-6] == pytest.approx(max(fitted.y[0], EPS), abs=1e-9)
    assert got[-1] == pytest.approx(min(fitted.y[-1], 1 - EPS), abs=1e-9)
    assert np.all(np.diff(got[np.argsort(fresh)]) >= -1e-12)  # monotone


def test_one_class_or_separable_rows_are_refused_with_the_task_named():
    z = np.linspace(-3, 3, 50)
    with pytest.raises(ValueError, match="task 'click'.*both labels"):
        fit_platt(z, np.zeros(50), task="click")
    with pytest.raises(ValueError, match="task 'click'.*both labels"):
        fit_isotonic(z, np.ones(50), task="click")
    separated = (z > 0).astype(float)
    with pytest.raises(ValueError, match="task 'click'.*separate.*isotonic"):
        fit_platt(z, separated, task="click")
    assert fit_isotonic(z, separated).y[0] == 0.0  # isotonic fits them


def test_calibration_fit_reads_each_task_space_and_weights():
    schema = Schema(dense=[DenseFeature(name="x")],
                    tasks=[Task(name="watch", type="regression"), Task(name="click", calibration="platt")])
    z, y, rng = noisy_logits(400, seed=3)
    mask = rng.random(400) < 0.7
    weights = rng.uniform(0.5, 2, 400)
    logits = torch.tensor(np.stack([rng.normal(size=400), z], 1), dtype=torch.float32)
    labels = torch.tensor(np.stack([rng.normal(size=400), np.where(mask, y, 0)], 1), dtype=torch.float32)
    targets = TensorData(torch.zeros(400, 0), torch.zeros(400, 0), labels,
                         torch.tensor(np.stack([np.ones(400, bool), mask], 1)),
                         weights=torch.tensor(np.stack([np.ones(400), weights], 1), dtype=torch.float32))
    fitted = Calibration.fit(schema, logits, targets).maps["click"]
    expected = fit_platt(logits[mask, 1].double().numpy(), y[mask], weights[mask].astype(np.float32))
    assert (fitted.a, fitted.b) == pytest.approx((expected.a, expected.b), abs=1e-9)


# --------------------------------------------------------------------------- the model


def test_calibration_lowers_the_test_ece_of_a_miscalibrated_model(run):
    metrics = run[0].test_metrics
    for task in ("y1", "y2"):  # focal loss leaves the probabilities badly calibrated
        assert metrics[f"uncalibrated/ece/{task}"] > 0.1
        assert metrics[f"ece/{task}"] < 0.5 * metrics[f"uncalibrated/ece/{task}"]
        assert metrics[f"logloss/{task}"] < metrics[f"uncalibrated/logloss/{task}"]
    assert metrics["auc/y1"] == pytest.approx(metrics["uncalibrated/auc/y1"], abs=1e-4)  # Platt: a > 0, monotone
    assert run[0].trained.calibration.maps["y1"].a > 0
    assert not any(k.startswith("uncalibrated/") and k.endswith(("/y3", "/y4")) for k in metrics)


def test_calibration_with_logits_made_overconfident():
    """Logits of a fixed model multiplied by 3: both methods undo most of the ECE it adds."""
    z, y, _ = noisy_logits(4000, seed=4)
    valid, test = slice(0, 2000), slice(2000, None)
    sharp = 3 * z
    before = expected_calibration_error(y[test], expit(sharp[test]))
    for fit in (fit_platt, fit_isotonic):
        fitted = fit(sharp[valid], y[valid])
        schema = Schema(dense=[DenseFeature(name="x")], tasks=[Task(name="t", calibration=fitted.method)])
        calibrated = Calibration(schema, {"t": fitted})(torch.tensor(sharp[test, None]))
        after = expected_calibration_error(y[test], torch.sigmoid(calibrated[:, 0]).numpy())
        assert before > 0.1 and after < 0.04, (fit.__name__, before, after)


def test_tasks_without_calibration_are_untouched_bit_for_bit(run):
    result, _, cfg, table = run
    trained = result.trained
    data = trained.encoder.transform(table, labels=False)
    with torch.no_grad():
        trained.model.eval()
        raw = trained.model(data.features).logits
    calibrated = trained.outputs(data)[0]
    assert torch.equal(calibrated[:, 2:], raw[:, 2:])  # y3 (binary) and y4 (regression)
    assert not torch.allclose(calibrated[:, :2], raw[:, :2])
    platt = trained.calibration.maps["y1"]
    torch.testing.assert_close(calibrated[:, 0], platt.a * raw[:, 0] + platt.b, atol=1e-5, rtol=1e-6)
    plain = Calibration(Schema(dense=[DenseFeature(name="x")], tasks=[Task(name="t")]))
    logits = torch.randn(5, 1)
    assert plain(logits) is logits  # the identity: the very tensor


def test_folder_round_trip(run):
    result, folder, _, table = run
    text = (folder / CALIBRATION).read_text()
    stored = json.loads(text)["tasks"]
    assert stored["y1"]["method"] == "platt" and isinstance(stored["y1"]["a"], float)
    assert stored["y2"]["method"] == "isotonic" and all(isinstance(v, float) for v in stored["y2"]["x"])
    assert set(stored) == {"y1", "y2"}
    assert CALIBRATION in json.loads((folder / "manifest.json").read_text())["sha256"]
    loaded = load(folder)
    pd.testing.assert_frame_equal(loaded.predict(table), result.trained.predict(table), check_exact=True)
    assert loaded.calibration.maps == result.trained.calibration.maps
    assert loaded.test_metrics["uncalibrated/ece/y1"] == result.test_metrics["uncalibrated/ece/y1"]
    evaluated = loaded.evaluate(table)
    assert evaluated["ece/y1"] == pytest.approx(expected_calibration_error(
        table["y1"].to_numpy(), loaded.predict(table)["y1"].to_numpy()), abs=1e-9)


def test_damaged_or_mismatched_calibration_file_is_refused(run, tmp_path):
    result, folder, cfg, _ = run
    (folder / CALIBRATION).write_text((folder / CALIBRATION).read_text())  # unchanged: still loads
    load(folder)
    copy = tmp_path / "copy"
    result.trained.save(copy)
    stored = json.loads((copy / CALIBRATION).read_text())
    stored["tasks"]["y1"]["a"] = 2.0
    (copy / CALIBRATION).write_text(json.dumps(stored))
    with pytest.raises(DamagedFolder, match="calibration.json does not match its sha256"):
        load(copy)
    (copy / CALIBRATION).unlink()
    write_manifest(copy)  # a whole folder, but without the calibration its config asks for
    with pytest.raises(DamagedFolder, match="calibration.json does not hold the calibration"):
        load(copy)
    schema = cfg.schema
    with pytest.raises(ValueError, match="task 'y2' asks for calibration 'isotonic'"):
        Calibration.from_json(schema, json.dumps({"tasks": {"y1": stored["tasks"]["y1"]}}))
    with pytest.raises(ValueError, match=r"calibration of task\(s\) \['y3'\], which ask for none"):
        Calibration.from_json(schema, json.dumps({"tasks": stored["tasks"] | {"y3": stored["tasks"]["y1"]}}))
    with pytest.raises(ValueError, match="x must increase strictly"):
        IsotonicMap(x=[0.1, 0.1], y=[0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        Calibration.from_json(schema, '{"tasks": {"y1": {"method": "platt", "a": NaN, "b": 0}}}')


def onnx_predictions(trained, cfg, table, path):
    import onnxruntime

    export_onnx(trained, path)
    session = onnxruntime.InferenceSession(str(path))
    return session.run(["predictions"], raw_inputs(cfg, table))[0]


def raw_inputs(cfg, table):
    sparse = {f.name: np.array([str(v) for v in table[f.name]], dtype=object) for f in cfg.schema.sparse}
    return sparse | {"dense": table[[f.name for f in cfg.schema.dense]].to_numpy(dtype=np.float32)}


def test_onnx_torchscript_and_service_apply_the_calibration(run, tmp_path):
    """Every way of predicting equals `predict` to 1e-5, with an isotonic map of moderate slopes
    (a fitted one is steep in places: the next test)."""
    _, fitted_folder, cfg, table = run
    trained = load(fitted_folder)
    smooth = IsotonicMap(x=[0.05, 0.3, 0.6, 0.9], y=[0.02, 0.2, 0.7, 0.95])
    trained.calibration = Calibration(cfg.schema, {"y1": trained.calibration.maps["y1"], "y2": smooth})
    folder = trained.save(tmp_path / "smooth")
    trained = load(folder)
    expected = trained.predict(table)
    np.testing.assert_allclose(onnx_predictions(trained, cfg, table, tmp_path / "m.onnx"), expected.to_numpy(),
                               atol=1e-5, rtol=0)
    export_torchscript(trained, tmp_path / "m.pt")
    inputs = raw_inputs(cfg, table)
    got = torch.jit.load(str(tmp_path / "m.pt"))({k: list(v) for k, v in inputs.items() if k != "dense"},
                                                 torch.from_numpy(inputs["dense"])).numpy()
    np.testing.assert_allclose(got, expected.to_numpy(), atol=1e-5, rtol=0)
    rows = table[[f.name for f in cfg.schema.sparse + cfg.schema.dense]].head(20).to_dict(orient="records")
    for backend in ("onnx", "torch"):
        answer = TestClient(create_app(folder, backend=backend)).post("/predict", json={"rows": rows})
        served = pd.DataFrame(answer.json()["predictions"])[expected.columns]
        np.testing.assert_allclose(served.to_numpy(), expected.head(20).to_numpy(), atol=1e-5, rtol=0)
    with torch.no_grad():
        raw = trained.model(trained.encoder.transform(table, labels=False).features).logits.numpy()
    for k in (0, 1):  # the checks above could fail: calibration moves these columns
        assert np.abs(expit(raw[:, k]) - expected.iloc[:, k].to_numpy()).max() > 0.05


def test_export_of_a_fitted_isotonic_map(run, tmp_path):
    """A fitted isotonic map rises steeply between adjacent validation rows at the edges of its
    flat steps (slopes dp'/dp of hundreds), so there the export's float32 logit, which differs
    from PyTorch's by about 1e-6, shows amplified; every other column agrees to 1e-5."""
    result, folder, cfg, table = run
    trained = load(folder)
    expected = trained.predict(table).to_numpy()
    got = onnx_predictions(trained, cfg, table, tmp_path / "m.onnx")
    np.testing.assert_allclose(got[:, [0, 2, 3]], expected[:, [0, 2, 3]], atol=1e-5, rtol=0)
    fitted = trained.calibration.maps["y2"]
    steepest = np.max(np.diff(fitted.y) / np.diff(fitted.x))
    assert steepest > 10
    np.testing.assert_allclose(got[:, 1], expected[:, 1], atol=1e-5 + 0.25 * 4e-6 * steepest, rtol=0)


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize("tasks, message", [
    ([{"name": "y1", "type": "regression", "calibration": "platt"}], "task 'y1': calibration 'platt' applies to"),
    ([{"name": "y1", "type": "multiclass", "options": {"classes": 2}, "calibration": "isotonic"}],
     "task 'y1': calibration 'isotonic' applies to"),
    ([{"name": "y1", "calibration": "platt"}, {"name": "y2", "within": "y1"}], "task 'y1'.*nested pair \\(y2 within y1"),
    ([{"name": "y1"}, {"name": "y2", "within": "y1", "calibration": "isotonic"}], "task 'y2'.*nested pair"),
    ([{"name": "y1", "calibration": "beta"}], "calibration"),
])
def test_bad_configs_are_refused_with_the_task_named(tasks, message):
    with pytest.raises(ValueError, match=message):
        config(tasks)


def test_esmm_tasks_cannot_be_calibrated():
    with pytest.raises(ValueError, match=r"task\(s\) \['y1'\].*esmm"):  # when the config is read
        config([{"name": "y1", "calibration": "platt"}, {"name": "y2"}], {"name": "esmm"})


def test_no_validation_split_or_no_fit_is_an_error(run, tmp_path):
    result, _, cfg, table = run
    with pytest.raises(ValueError, match=r"\['y1', 'y2'\] ask for calibration.*validation split: this run has none"):
        calibrate(cfg.schema, trainer=None, valid=None)
    unfitted = TrainedModel.build(cfg, result.trained.encoder)
    with pytest.raises(ValueError, match="this model has none yet"):
        unfitted.predict(table)
    with pytest.raises(ValueError, match="has not been fitted"):
        unfitted.save(tmp_path / "unfitted")
