"""Configuration values: declared ranges, list lengths and choices, and valid_metric against topk/metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dgmrec.config import RANGES, Interval, resolve_config
from dgmrec.errors import ConfigError
from dgmrec.models import available_models, build_model
from dgmrec.training.trainer import Trainer

BEST = sorted(p.stem.split("_", 1) for p in (Path(__file__).parents[1] / "src/dgmrec/configs/best").glob("*.yaml"))


@pytest.mark.parametrize(("model", "key", "value", "needle"), [
    ("LightGCN", "epochs", -1, "key 'epochs' must be at least 1, got -1"),
    ("LightGCN", "epochs", 0, "key 'epochs' must be at least 1"),
    ("LightGCN", "learning_rate", float("nan"), "key 'learning_rate' must be greater than 0, got nan"),
    ("LightGCN", "learning_rate", -0.001, "key 'learning_rate' must be greater than 0"),
    ("LightGCN", "learning_rate", 0.0, "key 'learning_rate' must be greater than 0"),
    ("LightGCN", "learning_rate", float("inf"), "key 'learning_rate' must be greater than 0"),
    ("LightGCN", "weight_decay", -1e-4, "key 'weight_decay' must be at least 0"),
    ("LightGCN", "train_batch_size", 0, "key 'train_batch_size' must be at least 1"),
    ("LightGCN", "eval_batch_size", -5, "key 'eval_batch_size' must be at least 1"),
    ("LightGCN", "eval_step", 0, "key 'eval_step' must be at least 1"),
    ("LightGCN", "stopping_step", -1, "key 'stopping_step' must be at least 0"),
    ("LightGCN", "seed", -3, "key 'seed' must be at least 0"),
    ("LightGCN", "embedding_size", 0, "key 'embedding_size' must be at least 1"),
    ("LightGCN", "topk", [0, 20], "key 'topk' must be at least 1, got [0, 20]"),
    ("LightGCN", "topk", [], "key 'topk' must have at least 1 element"),
    ("LightGCN", "topk", [10, "x"], "key 'topk[1]' must be an integer"),
    ("LightGCN", "metrics", ["recall", "auc"], "key 'metrics' has unknown value 'auc'"),
    ("LightGCN", "metrics", [], "key 'metrics' must have at least 1 element"),
    ("LightGCN", "learning_rate_scheduler", [0.9], "key 'learning_rate_scheduler' must have exactly 2 elements"),
    ("LightGCN", "learning_rate_scheduler", [0.9, 0], "key 'learning_rate_scheduler' must be greater than 0"),
    ("LightGCN", "learning_rate_scheduler", [0.9, "x"], "key 'learning_rate_scheduler[1]' must be a number"),
    ("LightGCN", "valid_metric", "recall@100", "key 'valid_metric' must be one of metrics"),
    ("LightGCN", "valid_metric", "auc@20", "key 'valid_metric' must be one of metrics"),
    ("LightGCN", "valid_metric", "recall", "key 'valid_metric' must be one of metrics"),
    ("LightGCN", "n_ui_layers", -1, "key 'n_ui_layers' must be at least 0"),
    ("LightGCN", "reg_weight", -0.1, "key 'reg_weight' must be at least 0"),
    ("MGCN", "knn_k", 0, "key 'knn_k' must be at least 1"),
    ("BM3", "dropout", 1.0, "key 'dropout' must be in [0, 1), got 1.0"),
    ("LGMRec", "keep_rate", 0.0, "key 'keep_rate' must be in (0, 1]"),
    ("MILK", "alpha", 0.0, "key 'alpha' must be greater than 0"),  # MILK's own range
    ("SLMRec", "temp", 0.0, "key 'temp' must be greater than 0"),
    ("DGMRec", "recon", -0.1, "key 'recon' must be at least 0"),
    ("DGMRec", "avg_lambda", 1.5, "key 'avg_lambda' must be in [0, 1]"),
    ("DGMRec", "club_hidden", 1, "key 'club_hidden' must be at least 2"),
])
def test_out_of_range_value_is_an_error_naming_the_key(model, key, value, needle):
    with pytest.raises(ConfigError) as exc:
        resolve_config(model, "synthetic", overrides={key: value})
    assert str(exc.value).startswith(f"--set: {needle}")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("model", "overrides"), [
    ("LightGCN", {"stopping_step": 0, "weight_decay": 0.0, "n_ui_layers": 0, "stopping_bpr_below": 0.0}),
    ("LightGCN", {"epochs": 1, "train_batch_size": 1, "topk": [1], "valid_metric": "recall@1"}),
    ("LightGCN", {"metrics": ["ndcg"], "topk": [5], "valid_metric": "ndcg@5"}),
    ("BM3", {"dropout": 0.0}),
    ("LGMRec", {"keep_rate": 1.0, "alpha": 0.0}),  # LGMRec's alpha is a weight: 0 is allowed
    ("DGMRec", {"avg_lambda": 0.0, "sampler": 0.0, "club_steps": 0}),
])
def test_boundary_values_are_accepted(model, overrides):
    cfg, _ = resolve_config(model, "synthetic", overrides=overrides)
    assert all(cfg[k] == v for k, v in overrides.items())


@pytest.mark.parametrize(("model", "dataset"), BEST)
def test_shipped_best_configurations_are_in_range(model, dataset):
    resolve_config(model, dataset)


@pytest.mark.parametrize("model", available_models())
def test_shipped_model_defaults_are_in_range(model):
    resolve_config(model, "synthetic")


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: -0.5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'learning_rate' must be greater than 0"):
        resolve_config("LightGCN", "synthetic", file=path)


def test_valid_metric_is_checked_against_the_final_topk():
    # the file sets a valid_metric the default topk lacks; a later --set of topk makes it valid
    cfg, _ = resolve_config("LightGCN", "synthetic", overrides={"valid_metric": "recall@5", "topk": [5, 10]})
    assert cfg["valid_metric"] == "recall@5"
    with pytest.raises(ConfigError, match=r"^--set: key 'valid_metric'.*topk \[5\], got 'recall@20'"):
        resolve_config("LightGCN", "synthetic", overrides={"topk": [5]})


def test_the_trainer_checks_a_hand_made_configuration(small2, tmp_path):
    cfg, _ = resolve_config("MFBPR", small2.name)
    model = build_model("MFBPR", small2, cfg)
    with pytest.raises(ConfigError, match="key 'eval_step' must be at least 1"):
        Trainer(model, small2, {**cfg, "eval_step": 0}, tmp_path, progress=False)


def test_interval_notation():
    half_open = Interval.parse("(0, 1]")
    assert 1.0 in half_open and 0.5 in half_open and 0.0 not in half_open and math.nan not in half_open
    assert str(half_open) == "in (0, 1]" and str(Interval.parse("[2, inf)")) == "at least 2"
    assert all(Interval.parse(text) for text in RANGES.values())
    with pytest.raises(ValueError):
        Interval.parse("0..1")
