"""The focal, tweedie and lognormal kinds, and kind options (`Task.options`).

Each loss is checked against its definition evaluated in 60-digit decimal arithmetic, so
the reference shares nothing with the stable torch formulas (nor their float rounding):
focal, Lin et al. ICCV 2017 Eq. 5; Tweedie, the negative log-likelihood of Jorgensen's
exponential dispersion model (the unit deviance / 2 less its term in y alone), as in
Yang, Qian & Zou (J. Bus. Econ. Stat. 2018); lognormal, the squared error of log y.
"""

import math
from decimal import Decimal, localcontext

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mtlrec.config import ConfigError, load_config
from mtlrec.data import DataError, Encoder
from mtlrec.experiment import run_experiment
from mtlrec.schema import Schema
from mtlrec.tasks import KINDS, TaskSet, higher_is_better
from mtlrec.train.evaluation import constant_baseline
from mtlrec.train.metrics import mean_squared_error_of_logs, poisson_deviance, tweedie_deviance
from mtlrec.trained import load

HARD = [-50.0, -20.0, -3.0, -0.5, 0.0, 0.7, 4.0, 20.0, 50.0]


def exact(formula, *values) -> float:
    """formula(*values) in 60-digit decimals (each float taken exactly), rounded to a float."""
    with localcontext() as ctx:
        ctx.prec = 60
        return float(formula(*(None if v is None else Decimal(float(v)) for v in values)))


def focal_plain(z, y, gamma, alpha):
    """-alpha_t (1 - p_t)^gamma log(p_t), p = 1 / (1 + e^-z) (Lin et al. 2017, Eq. 5)."""
    p = 1 / (1 + (-z).exp())
    p_t = p if y == 1 else 1 - p
    alpha_t = 1 if alpha is None else (alpha if y == 1 else 1 - alpha)
    return -alpha_t * (1 - p_t) ** gamma * p_t.ln()


def tweedie_plain(z, y, p):
    """-y mu^(1-p) / (1-p) + mu^(2-p) / (2-p), mu = e^z."""
    mu = z.exp()
    return -y * mu ** (1 - p) / (1 - p) + mu ** (2 - p) / (2 - p)


def lognormal_plain(z, y):
    return (z - y.ln()) ** 2


def schema_of(*tasks):
    """A schema of one dense input and the given tasks ((name, type, options) each)."""
    return Schema(dense=[{"name": "x"}], tasks=[{"name": n, "type": t, "options": o} for n, t, o in tasks])


def decimal_options(options):
    """The options as exact decimals (the floats the kind reads), None kept."""
    return {k: None if v is None else Decimal(v) for k, v in options.items()}


def kind(type_, **options):
    return schema_of(("t", type_, options)).tasks[0].kind


def grid(labels):
    """Every HARD logit with every label, float64, as two flat tensors."""
    z, y = zip(*[(z, y) for z in HARD for y in labels])
    return torch.tensor(z, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)


CASES = [  # kind, options, labels, plain formula (z, y, options)
    ("focal", {}, [0.0, 1.0], lambda z, y, o: focal_plain(z, y, Decimal(2), Decimal("0.25"))),
    ("focal", {"gamma": 0.5, "alpha": 0.9}, [0.0, 1.0], lambda z, y, o: focal_plain(z, y, o["gamma"], o["alpha"])),
    ("focal", {"gamma": 5.0, "alpha": None}, [0.0, 1.0], lambda z, y, o: focal_plain(z, y, o["gamma"], None)),
    ("focal", {"gamma": 0.0, "alpha": None}, [0.0, 1.0], lambda z, y, o: focal_plain(z, y, o["gamma"], None)),
    ("tweedie", {}, [0.0, 0.3, 1.0, 7.5], lambda z, y, o: tweedie_plain(z, y, Decimal("1.5"))),
    ("tweedie", {"power": 1.1}, [0.0, 0.3, 1.0, 7.5], lambda z, y, o: tweedie_plain(z, y, o["power"])),
    ("tweedie", {"power": 1.9}, [0.0, 0.3, 1.0, 7.5], lambda z, y, o: tweedie_plain(z, y, o["power"])),
    ("lognormal", {}, [1e-3, 0.5, 1.0, 42.0], lambda z, y, o: lognormal_plain(z, y)),
]


@pytest.mark.parametrize("type_, options, labels, plain", CASES)
def test_each_loss_is_its_formula_at_hard_logits(type_, options, labels, plain):
    z, y = grid(labels)
    got = kind(type_, **options).loss(z, y)
    o = decimal_options(options)
    expected = [exact(lambda a, b: plain(a, b, o), zi, yi) for zi, yi in zip(z.tolist(), y.tolist())]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("type_, options, labels, plain", CASES)
def test_each_gradient_is_finite_and_the_formulas_slope(type_, options, labels, plain):
    """d loss / d z against a central difference of the formula in 100-digit decimals (step 1e-30)."""
    z, y = grid(labels)
    z.requires_grad_()
    (grad,) = torch.autograd.grad(kind(type_, **options).loss(z, y).sum(), z)
    assert torch.isfinite(grad).all()
    with localcontext() as ctx:
        ctx.prec = 100
        o, h = decimal_options(options), Decimal("1e-30")
        slope = [float((plain(Decimal(a) + h, Decimal(b), o) - plain(Decimal(a) - h, Decimal(b), o)) / (2 * h))
                 for a, b in zip(z.tolist(), y.tolist())]
    torch.testing.assert_close(grad, torch.tensor(slope, dtype=torch.float64), rtol=1e-9, atol=1e-50)


@pytest.mark.parametrize("type_, label", [("focal", 1.0), ("tweedie", 2.0), ("lognormal", 3.0)])
def test_float32_losses_and_gradients_stay_finite_outside_the_space(type_, label):
    """Through the task set, in float32, with hard logits and rows outside the task's space
    (whose label is 0, invalid for lognormal): the loss is the mean over the space's rows."""
    tasks = TaskSet(schema_of(("t", type_, {}), ("b", "binary", {})))
    z = torch.tensor([[v, 0.0] for v in HARD], requires_grad=True)
    mask = torch.tensor([[i % 3 != 0, True] for i in range(len(HARD))])
    labels = torch.where(mask, torch.tensor([label, 1.0]), 0.0)
    losses = tasks.losses(z, labels, mask)
    (grad,) = torch.autograd.grad(losses.sum(), z)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    assert (grad[~mask[:, 0], 0] == 0).all()
    rows = mask[:, 0]
    expected = tasks.kinds[0].loss(z[rows, 0].double(), torch.full((int(rows.sum()),), label, dtype=torch.float64))
    assert losses[0].item() == pytest.approx(expected.mean().item(), rel=1e-6)


def test_focal_with_gamma_0_and_no_alpha_is_the_log_loss():
    z = torch.tensor(HARD, dtype=torch.float64).repeat(2)
    y = torch.cat([torch.zeros(len(HARD)), torch.ones(len(HARD))]).double()
    # torch's log loss rounds log1p(e^-50) away beside 50 (an absolute error of eps |z|)
    torch.testing.assert_close(kind("focal", gamma=0.0, alpha=None).loss(z, y),
                               F.binary_cross_entropy_with_logits(z, y, reduction="none"), rtol=1e-14, atol=1e-14)
    # gamma > 0 shrinks each row's loss by (1 - p_t)^gamma: most for the rows already right
    z, y = z[z.abs() <= 20], y[z.abs() <= 20]
    ratio = kind("focal", gamma=2.0, alpha=None).loss(z, y) / F.binary_cross_entropy_with_logits(z, y, reduction="none")
    assert (ratio < 1).all() and z[y == 1][ratio[y == 1].argmin()] == 20 and z[y == 0][ratio[y == 0].argmin()] == -20


def test_tweedie_loss_is_half_the_deviance_less_a_term_in_y_and_minimised_at_the_label():
    p = 1.3
    y = np.array([0.0, 0.2, 1.0, 3.0, 10.0])
    z = np.array([-1.0, 0.5, 2.0])
    k = kind("tweedie", power=p)
    for yi in y:
        loss = k.loss(torch.tensor(z), torch.full((3,), yi, dtype=torch.float64)).numpy()
        half_deviance = [tweedie_deviance(np.array([yi]), np.array([math.exp(zi)]), power=p) / 2 for zi in z]
        np.testing.assert_allclose(half_deviance - loss, yi ** (2 - p) / ((1 - p) * (2 - p)), rtol=1e-12, atol=1e-12)
    at = torch.tensor(np.log(y[1:]), requires_grad=True)
    k.loss(at, torch.tensor(y[1:])).sum().backward()
    torch.testing.assert_close(at.grad, torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_tweedie_deviance_metric_against_its_formula_and_the_poisson_limit():
    y = np.array([0.0, 0.5, 2.0, 0.0, 9.0])
    mu = np.array([0.3, 0.5, 1.0, 2.0, 4.0])
    w = np.array([1.0, 2.0, 0.5, 1.0, 3.0])
    p = 1.7
    terms = [2 * (yi ** (2 - p) / ((1 - p) * (2 - p)) - yi * mi ** (1 - p) / (1 - p) + mi ** (2 - p) / (2 - p))
             for yi, mi in zip(y, mu)]
    assert tweedie_deviance(y, mu, power=p) == pytest.approx(sum(terms) / 5, rel=1e-12)
    assert tweedie_deviance(y, mu, w, power=p) == pytest.approx(np.dot(terms, w) / w.sum(), rel=1e-12)
    assert tweedie_deviance(y[1:3], y[1:3], power=p) == pytest.approx(0, abs=1e-12)
    assert tweedie_deviance(y, mu, power=1 + 1e-7) == pytest.approx(poisson_deviance(y, mu), rel=1e-5)


def test_lognormal_predicts_the_median_and_reports_log_and_original_scale_errors():
    tasks = TaskSet(schema_of(("watch", "lognormal", {})))
    torch.testing.assert_close(tasks.predict(torch.tensor([[0.0], [math.log(30.0)]])), torch.tensor([[1.0], [30.0]]))
    # a log-normal's median is e^mu: the logit that minimises the loss over its samples
    rng = np.random.default_rng(0)
    y = np.exp(rng.normal(1.2, 0.8, 20_000))
    z = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([z], lr=0.2)
    for _ in range(200):
        optimizer.zero_grad()
        tasks.losses(z.expand(len(y))[:, None], torch.tensor(y, dtype=torch.float32)[:, None],
                     torch.ones(len(y), 1, dtype=torch.bool))[0].backward()
        optimizer.step()
    assert math.exp(z.item()) == pytest.approx(np.median(y), rel=0.02)
    p = np.array([2.0, 3.0, 0.5])
    labels = np.array([1.0, 3.0, 2.0])
    m = tasks.metrics(p[:, None], labels[:, None], np.ones((3, 1), dtype=bool))
    assert m == {"mse_log/watch": pytest.approx(np.mean([math.log(2) ** 2, 0.0, math.log(4) ** 2])),
                 "mae/watch": pytest.approx((1.0 + 0.0 + 1.5) / 3)}
    assert mean_squared_error_of_logs(labels, p, np.array([1.0, 0.0, 1.0])) == pytest.approx(
        (math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_metric_names_directions_baselines_and_uncertainty_constants():
    tasks = TaskSet(schema_of(("click", "focal", {}), ("spend", "tweedie", {"power": 1.2}),
                              ("watch", "lognormal", {})))
    assert tasks.metric_names == ["auc/click", "tweedie_deviance/spend", "mse_log/watch",
                                  "logloss/click", "ece/click", "mae/spend", "mae/watch"]
    assert [higher_is_better(m) for m in tasks.metric_names] == [True, False, False, False, False, False, False]
    assert tasks.uncertainty_scales.tolist() == [1.0, 1.0, 0.5]
    labels = torch.tensor([[0.0, 3.0, 10.0], [1.0, 0.0, 40.0], [0.0, 7.5, 160.0], [1.0, 9.0, 0.0]])
    mask = torch.tensor([[True] * 3, [True] * 3, [True] * 3, [False, False, False]])
    baseline = tasks.predict(tasks.baseline_logits(labels, mask))
    # the mean for focal and tweedie; for lognormal the geometric mean, exp(mean log y): the
    # best constant on the log scale the loss is measured on
    torch.testing.assert_close(baseline, torch.tensor([1 / 3, 3.5, 40.0]))
    assert [KINDS[n].probability for n in ("focal", "tweedie", "lognormal")] == [True, False, False]
    # the deviance reported is the task's own power's
    y, mu = np.array([[0.0, 0.0, 1.0], [0.0, 2.0, 1.0]]), np.array([[0.5, 1.0, 1.0], [0.5, 3.0, 1.0]])
    got = tasks.metrics(mu, y, np.ones((2, 3), dtype=bool))["tweedie_deviance/spend"]
    assert got == pytest.approx(tweedie_deviance(y[:, 1], mu[:, 1], power=1.2))
    assert got != pytest.approx(tweedie_deviance(y[:, 1], mu[:, 1], power=1.5))


def test_tasks_of_one_kind_with_different_options_are_scored_apart():
    tasks = TaskSet(schema_of(("a", "focal", {"gamma": 0.0}), ("b", "focal", {}), ("c", "focal", {"gamma": 2})))
    assert len(tasks.present) == 2  # a alone; b and c have equal options
    torch.manual_seed(0)
    z = (torch.randn(64, 1, dtype=torch.float64) * 3).expand(-1, 3)  # the same rows in every column
    y = (torch.rand(64, 1) > 0.5).double().expand(-1, 3)
    mask = torch.ones(64, 3, dtype=torch.bool)
    expected = torch.stack([kind("focal", gamma=g).loss(z[:, 0], y[:, 0]).mean() for g in [0.0, 2.0, 2.0]])
    torch.testing.assert_close(tasks.losses(z, y, mask), expected, rtol=1e-14, atol=0)
    assert expected[0] > 1.1 * expected[1]  # gamma = 0: no down-weighting, a larger loss


def test_existing_kinds_are_unchanged_beside_the_new_ones():
    """Old kinds' columns give the same bits (losses, gradients, predictions) whether or not
    new kinds sit beside them, wherever they sit."""
    old = [("click", "binary", {}), ("watch", "regression", {}), ("shares", "count", {})]
    new = [("f", "focal", {}), ("t", "tweedie", {}), ("l", "lognormal", {})]
    torch.manual_seed(1)
    n = 40
    columns = {"click": torch.randint(0, 2, (n,)).float(), "watch": torch.randn(n),
               "shares": torch.poisson(torch.full((n,), 2.0)), "f": torch.randint(0, 2, (n,)).float(),
               "t": torch.rand(n) * 5, "l": torch.rand(n) + 0.1}
    logits = {name: torch.randn(n) * 4 for name in columns}
    mask = {name: torch.rand(n) > 0.2 for name in columns}

    def scored(tasks):
        """Per row: each task's loss and its logit's gradient (one row a call: no reduction
        whose order could differ), and the predictions."""
        z, y, m = (torch.stack([d[name] for name in tasks.names], 1) for d in (logits, columns, mask))
        z.requires_grad_()
        losses = torch.stack([tasks.losses(z[i : i + 1], y[i : i + 1], m[i : i + 1]) for i in range(n)])
        (grad,) = torch.autograd.grad(losses.sum(), z)
        return losses, grad, tasks.predict(z.detach())

    alone = scored(TaskSet(schema_of(*old)))
    for arrangement in (old + new, [new[0], *old, *new[1:]]):
        tasks = TaskSet(schema_of(*arrangement))
        cols = [tasks.names.index(name) for name, _, _ in old]
        for mine, reference in zip(scored(tasks), alone):
            assert torch.equal(mine[:, cols], reference)


def test_bad_labels_name_the_column_and_the_row():
    table = pd.DataFrame({"x": [0.1, 0.2, 0.3, 0.4], "c": [0.0, 1.0, 1.0, 0.0], "spend": [0.0, 2.5, 0.0, 1.0],
                          "watch": [1.5, np.nan, 30.0, 0.2]})
    encoder = Encoder(schema_of(("c", "focal", {}), ("spend", "tweedie", {}), ("watch", "lognormal", {}))).fit(table)
    data = encoder.transform(table)  # a missing lognormal label is outside the space, not an error
    assert data.mask[:, 2].tolist() == [True, False, True, True]
    for column, value, rule in [("c", 0.5, "0 or 1"), ("spend", -1.0, "finite and >= 0"),
                                ("watch", 0.0, "finite and > 0"), ("watch", np.inf, "finite and > 0")]:
        bad = table.copy()
        bad.loc[2, column] = value
        with pytest.raises(DataError, match=rf"label column '{column}' must be {rule}: row 2 holds {value:g}"):
            encoder.transform(bad)


@pytest.mark.parametrize("task, message", [
    ({"name": "c", "type": "focal", "options": {"gamma": -1}},
     "tasks.0: task 'c' option gamma: Input should be greater than or equal to 0"),
    ({"name": "c", "type": "focal", "options": {"alpha": 1.5}},
     "tasks.0: task 'c' option alpha: Input should be less than or equal to 1"),
    ({"name": "c", "type": "focal", "options": {"gama": 2}},
     "tasks.0: task 'c' has no option(s) ['gama']; allowed: ['gamma', 'alpha']"),
    ({"name": "spend", "type": "tweedie", "options": {"power": 2}},
     "tasks.0: task 'spend' option power: Input should be less than 2"),
    ({"name": "spend", "type": "tweedie", "options": {"power": 1.0}},
     "tasks.0: task 'spend' option power: Input should be greater than 1"),
    ({"name": "spend", "type": "tweedie", "options": {"power": "high"}},
     "tasks.0: task 'spend' option power: Input should be a valid number"),
    ({"name": "click", "options": {"gamma": 2}}, "tasks.0: task 'click' has no option(s) ['gamma']; allowed: []"),
    ({"name": "watch", "type": "lognormal", "options": {"sigma": 1}},
     "tasks.0: task 'watch' has no option(s) ['sigma']; allowed: []"),
    ({"name": "c", "type": "focal", "options": [2]}, "tasks.0.options: Input should be a valid dictionary"),
])
def test_bad_kind_options_are_config_errors_naming_the_task_and_option(task, message):
    with pytest.raises(ConfigError) as info:
        load_config({"data": {"source": "files", "train": "t.csv"}, "features": {"dense": [{"name": "x"}]},
                     "tasks": [task]})
    assert message in str(info.value)


def kinds_table(rows=3000, seed=0):
    """Dense x0..x3; click (rare positives), spend (compound Poisson-gamma: many zeros, a long
    tail), watch (log-normal), each driven by the inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 4))
    claims = rng.poisson(np.exp(0.8 * x[:, 0] - 0.5))
    spend = np.where(claims > 0, rng.gamma(np.maximum(2.0 * claims, 1e-9), np.exp(0.3 * x[:, 1])), 0.0)
    return pd.DataFrame({**{f"x{i}": x[:, i] for i in range(4)},
                         "click": (x[:, 2] + 0.5 * rng.standard_normal(rows) > 1.0).astype(float),
                         "spend": spend, "watch": np.exp(1.0 + 0.7 * x[:, 3] + 0.4 * rng.standard_normal(rows))})


def test_one_task_of_each_new_kind_trains_end_to_end(tmp_path):
    kinds_table().to_csv(tmp_path / "train.csv", index=False)
    cfg = load_config({
        "data": {"source": "files", "train": str(tmp_path / "train.csv")},
        "features": {"dense": [{"name": f"x{i}"} for i in range(4)]},
        "tasks": [{"name": "click", "type": "focal", "options": {"gamma": 1.0, "alpha": 0.5}},
                  {"name": "spend", "type": "tweedie", "options": {"power": 1.3}},
                  {"name": "watch", "type": "lognormal"}],
        "model": {"name": "mmoe", "expert_hidden": [16], "tower_hidden": [8]},
        "train": {"epochs": 5, "batch_size": 128, "lr": 0.01, "progress": False,
                  "early_stopping": {"metric": "tweedie_deviance/spend"}},
    })
    result = run_experiment(cfg, tmp_path / "model")
    names = ["auc/click", "tweedie_deviance/spend", "mse_log/watch", "logloss/click", "mae/spend", "mae/watch"]
    test = result.test_metrics
    assert set(names) <= set(test) and all(math.isfinite(test[m]) for m in names)
    assert [result.trained.tasks.kinds[k].options for k in range(3)] == [
        KINDS["focal"].Options(gamma=1.0, alpha=0.5), KINDS["tweedie"].Options(power=1.3), KINDS["lognormal"].Options()]
    encoder = result.trained.encoder
    other = kinds_table(seed=1)
    const = constant_baseline(TaskSet(encoder.schema), encoder.transform(kinds_table()), encoder.transform(other))
    model = result.trained.evaluate(other)
    assert model["auc/click"] > 0.8
    for metric in ("tweedie_deviance/spend", "mse_log/watch", "mae/watch"):  # lower is better
        assert model[metric] < 0.8 * const[metric], metric
    assert load(tmp_path / "model").tasks.kinds == result.trained.tasks.kinds  # the options are saved
    predicted = result.trained.predict(other)
    assert predicted["click"].between(0, 1).all() and (predicted[["spend", "watch"]] > 0).all().all()


def test_bounded_regression_stays_in_its_range_and_trains_to_the_labels(tmp_path):
    bounded = kind("regression", bounds=[1.0, 5.0])
    z = torch.tensor([-1e4, -2.0, 0.0, 3.0, 1e4], dtype=torch.float64)
    prediction = bounded.link(z)
    torch.testing.assert_close(prediction, 1.0 + 4.0 / (1.0 + torch.exp(-z)))  # lo + (hi - lo) sigmoid(z)
    assert prediction.min() >= 1.0 and prediction.max() <= 5.0
    y = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(bounded.loss(z, y), (prediction - y) ** 2)
    assert bounded.invalid_labels(np.array([0.5, 1.0, 5.0, 5.5])).tolist() == [True, False, False, True]
    assert bounded.label_rule == "finite and in [1.0, 5.0]"
    assert bounded.link(bounded.baseline_logit(torch.tensor(2.5))).item() == pytest.approx(2.5)
    assert kind("regression").link(z).equal(z)  # unbounded: the identity, as before
    with pytest.raises(Exception, match="lo < hi"):
        kind("regression", bounds=[5.0, 1.0])
    # a rating task trained through a config: every prediction inside [1, 5]
    rng = np.random.default_rng(0)
    x = rng.normal(size=600)
    rating = np.clip(np.round(3 + 1.5 * x + rng.normal(scale=0.3, size=600)), 1, 5)
    pd.DataFrame({"x": x, "rating": rating}).to_csv(tmp_path / "r.csv", index=False)
    from mtlrec.experiment import run_experiment

    cfg = load_config({"data": {"source": "files", "train": str(tmp_path / "r.csv")},
                       "features": {"dense": [{"name": "x"}]},
                       "tasks": [{"name": "rating", "type": "regression", "options": {"bounds": [1, 5]}}],
                       "model": {"name": "shared_bottom", "hidden": [8], "tower_hidden": [4]},
                       "train": {"epochs": 5, "lr": 0.02, "batch_size": 64, "progress": False}})
    result = run_experiment(cfg)
    predicted = result.trained.predict(pd.DataFrame({"x": np.linspace(-10, 10, 50)}))["rating"]
    assert predicted.between(1, 5).all() and predicted.iloc[-1] > 4.5 and predicted.iloc[0] < 1.5
    assert result.test_metrics["mse/rating"] < 0.5


def test_a_task_within_another_is_never_likelier_and_trains_as_the_product(tmp_path):
    from mtlrec.tasks import TaskSet, product_logit

    schema = Schema(dense=[{"name": "x"}], tasks=[{"name": "five_star", "within": "like"}, {"name": "like"},
                                                  {"name": "rating", "type": "regression"}])
    tasks = TaskSet(schema)
    z = torch.randn(50, 3, dtype=torch.float64) * 4
    p = tasks.predict(z)
    torch.testing.assert_close(p[:, 0], torch.sigmoid(z[:, 1]) * torch.sigmoid(z[:, 0]))  # P(like) P(5* | like)
    assert (p[:, 0] <= p[:, 1] + 1e-12).all()
    torch.testing.assert_close(p[:, 2], z[:, 2])  # others untouched
    y = torch.stack([torch.zeros(50), torch.ones(50), torch.zeros(50)], 1).double()
    mask = torch.ones(50, 3, dtype=torch.bool)
    expected = F.binary_cross_entropy_with_logits(product_logit(z[:, 1], z[:, 0]), y[:, 0])
    torch.testing.assert_close(tasks.losses(z, y, mask)[0], expected)  # the loss is on the product
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    base = tasks.predict(tasks.baseline_logits(labels, torch.ones(4, 3, dtype=torch.bool)))
    torch.testing.assert_close(base, torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64), atol=1e-5, rtol=0)
    for bad, message in (({"name": "a", "within": "zz"}, "within 'zz' is not a task"),
                         ({"name": "a", "within": "r"}, "both must predict a probability"),
                         ({"name": "a", "within": "a"}, "form a cycle")):
        with pytest.raises(Exception, match=message):
            Schema(dense=[{"name": "x"}], tasks=[bad, {"name": "r", "type": "regression"}])
    # through a config: ONNX export keeps the constraint
    rng = np.random.default_rng(0)
    x = rng.normal(size=800)
    like = (x + rng.normal(size=800) > 0).astype(int)
    five = like * (x > 0.8)
    pd.DataFrame({"x": x, "like": like, "five_star": five}).to_csv(tmp_path / "r.csv", index=False)
    from mtlrec.experiment import run_experiment
    from mtlrec.export import export_onnx
    from mtlrec.trained import load

    cfg = load_config({"data": {"source": "files", "train": str(tmp_path / "r.csv")},
                       "features": {"dense": [{"name": "x"}]},
                       "tasks": [{"name": "like"}, {"name": "five_star", "within": "like"}],
                       "model": {"name": "mmoe", "expert_hidden": [8], "tower_hidden": [4]},
                       "train": {"epochs": 3, "lr": 0.02, "batch_size": 64, "progress": False}})
    result = run_experiment(cfg, tmp_path / "m")
    table = pd.DataFrame({"x": np.linspace(-3, 3, 40)})
    predicted = load(tmp_path / "m").predict(table)
    assert (predicted["five_star"] <= predicted["like"] + 1e-7).all()
    assert result.test_metrics["auc/five_star"] > 0.8
    import onnxruntime

    session = onnxruntime.InferenceSession(str(export_onnx(load(tmp_path / "m"), tmp_path / "m.onnx")))
    feeds = {i.name: table[["x"]].to_numpy(np.float32) if "dense" in i.name else np.zeros((40, 0), np.int64)
             for i in session.get_inputs()}
    out = session.run(None, feeds)[0]
    np.testing.assert_allclose(out, predicted[["like", "five_star"]].to_numpy(), atol=1e-5)
