import pytest

from mtlrec.config import ConfigError, apply_overrides, load_config


def errors_of(raw):
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    return str(info.value)


def test_defaults_fill_schema_from_synthetic_data():
    cfg = load_config({"data": {"synthetic": {"dim": 5, "task_types": ["binary", "regression", "binary"]}}})
    assert cfg.schema.task_names == ["y1", "y2", "y3"] and len(cfg.schema.dense) == 5


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"train": {"epoch": 3}}, "train.epoch: unknown field; allowed: ['alternating', 'batch_size'"),
        ({"model": {"name": "moe"}}, "unknown model 'moe'; allowed: ['single_task', 'shared_bottom', 'asymmetric', 'cross_stitch', 'snr_aver', 'snr_trans', 'omoe', 'mmoe', 'routed_moe', 'ml_mmoe', 'dselect_k', 'cgc', 'ple', 'adatt', 'home', 'esmm', 'aitm', 'dbmtl', 'pepnet', 'stem']"),
        ({"model": {"name": "mmoe", "task_experts": 2}}, "model 'mmoe' has no option(s) ['task_experts']; allowed:"),
        ({"train": {"optimizer": "lbfgs"}}, "train.optimizer: Input should be 'adam', 'adamw', 'sgd' or 'adagrad'"),
        ({"tasks": [{"name": "a", "type": "ordinal"}]}, "tasks.0.type: unknown task type 'ordinal'; allowed: ['binary', 'regression', 'count', 'focal', 'tweedie', 'lognormal', 'multiclass']"),
        ({"tasks": [{"name": "a", "type": "multiclass"}]}, "tasks.0: task 'a' option classes: Field required"),
        ({"train": {"early_stopping": {"metric": "auc/y1"}}}, "train.early_stopping.metric 'auc/y1' is not one of"),
        ({"data": {"source": "files"}}, "source 'files' needs data.train"),
        ({"train": {"batch_size": 0}}, "train.batch_size: Input should be greater than or equal to 1"),
        ({"models": {"ple": {"num_experts": 3}}}, "model 'ple' has no option(s) ['num_experts']"),
        ({"data": {"synthetic": {"dim": 1}}}, "2 tasks need dim >= 2"),
    ],
)
def test_bad_fields_are_named_with_what_is_allowed(raw, expected):
    assert expected in errors_of(raw)


def test_unknown_field_lists_every_allowed_field():
    message = errors_of({"train": {"epoch": 3}})
    for field in ("'epochs'", "'lr'", "'weighting'", "'early_stopping'", "'precision'"):
        assert field in message


def test_file_data_needs_features_and_tasks():
    assert "features and tasks are required for file data in format 'table'" in errors_of({"data": {"source": "files", "train": "t.csv"}})


def test_duplicate_and_label_as_feature_are_rejected():
    base = {"data": {"source": "files", "train": "t.csv"}, "tasks": [{"name": "click"}]}
    assert "duplicate feature names: ['a']" in errors_of(base | {"features": {"dense": [{"name": "a"}, {"name": "a"}]}})
    assert "label columns used as input features: ['click']" in errors_of(base | {"features": {"dense": [{"name": "click"}]}})


def test_overrides_set_nested_fields_with_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: ple}\ntrain: {epochs: 2}\n")
    cfg = load_config(path, ["model.name=mmoe", "model.num_experts=3", "train.lr=0.1", "model.expert_hidden=[8, 4]"])
    assert cfg.model.name == "mmoe" and cfg.model.options == {"num_experts": 3, "expert_hidden": [8, 4]}
    assert cfg.train.lr == 0.1 and cfg.train.epochs == 2
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_the_models_block_sizes_the_model_a_config_trains(tiny_config):
    raw = tiny_config | {"model": {"name": "mmoe", "num_experts": 3},
                         "models": {"mmoe": {"num_experts": 2, "expert_hidden": [8]}, "ple": {"expert_hidden": [4]}}}
    cfg = load_config(raw)
    assert cfg.model.options == {"num_experts": 3, "expert_hidden": [8]}  # model's own options win
    switched = load_config(raw | {"model": {"name": "mmoe"}}, ["model.name=ple"])
    assert switched.model.options == {"expert_hidden": [4]}  # not PLE's default [256, 128]
