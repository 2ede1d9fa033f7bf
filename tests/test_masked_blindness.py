"""No model sees masked content: the true values of masked feature rows (any value, NaN included) change nothing
a model computes, bit for bit, under the same seed: training losses and their parts, the trained parameters,
scores and generated rows. The synthetic data keep the true features in masked rows, so a model, an imputation or
a data path that reads them would otherwise learn from content the protocol hides."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from dgmrec.data.dataset import RecDataset
from dgmrec.data.masks import draw_new_items
from dgmrec.data.mmrec import make_new_item_split
from dgmrec.data.synthetic import make_synthetic
from dgmrec.models import available_models
from dgmrec.models.base import ModelInput
from planted import all_scores, build, fit


@pytest.fixture(scope="module")
def tiny() -> dict[str, RecDataset]:
    ds = make_synthetic(n_users=50, n_items=40, modalities=(("image", 6), ("text", 5), ("audio", 4)),
                        interactions_per_user=8, missing_ratio=0.6, seed=21, name="tiny")
    counts = np.bincount(ds.train[:, 1], minlength=ds.n_items)
    return {"missing": ds, "new-items": make_new_item_split(ds, draw_new_items(counts))}


def with_masked_rows(ds: RecDataset, fill: str) -> RecDataset:
    """``ds`` whose masked rows hold other values: ``nan``, ``huge`` (random, 1e6 scale) or ``swap`` (another
    masked item's true row)."""
    rng = np.random.default_rng(5)
    features = {}
    for j, (m, x) in enumerate(ds.features.items()):
        x = x.copy()
        miss = ~ds.observed[:, j]
        if fill == "nan":
            x[miss] = np.nan
        elif fill == "huge":
            x[miss] = rng.normal(scale=1e6, size=(int(miss.sum()), x.shape[1]))
        else:
            x[miss] = x[miss][::-1]
        features[m] = x
    return replace(ds, features=features)


def run(name: str, ds: RecDataset, imputation: str = "mean") -> dict[str, Any]:
    """Everything the model computes in two short epochs (two batches each) and one evaluation."""
    model = build(name, ds, seed=3, missing_imputation=imputation)
    record: dict[str, Any] = {"initial": snapshot(model.state_dict())}
    parts: list[dict[str, float]] = []
    original_loss = model.loss

    def logged(batch):  # the loss parts of every step
        out = original_loss(batch)
        parts.append(dict(out.parts))
        return out

    model.loss = logged  # type: ignore[method-assign]
    record["losses"] = fit(model, ds, epochs=2, lr=0.01, batch_size=64, seed=3, max_batches=2)
    record["parts"] = parts
    record["scores"] = all_scores(model, epoch=1)
    record["state"] = snapshot(model.state_dict())
    for hook in ("completed_features", "generate_for_retrieval"):
        record[hook] = snapshot(getattr(model, hook)())
    return record


def snapshot(obj: Any) -> Any:
    """A deep copy of nested dicts/lists of tensors and plain values (a state dict's extra state included)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [snapshot(v) for v in obj]
    return obj


def assert_identical(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b or (a is None and b is None), f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("imputation", ["mean", "zero"])
@pytest.mark.parametrize("name", available_models())
def test_masked_content_changes_nothing(name, imputation, tiny):
    ds = tiny["missing"]
    reference = run(name, ds, imputation)
    assert all(np.isfinite(reference["losses"])) and np.isfinite(reference["scores"]).all()
    for fill in ("nan", "huge", "swap"):
        assert_identical(reference, run(name, with_masked_rows(ds, fill), imputation),
                         f"{name}, {imputation} imputation, masked rows {fill}")


@pytest.mark.parametrize("name", ["DGMRec", "CI2MG", "MILK", "SIBRAR", "LATTICE"])
def test_masked_content_changes_nothing_new_items(name, tiny):
    """New-item setting: evaluation-time generation and the imputation over old items only."""
    ds = tiny["new-items"]
    reference = run(name, ds)
    assert_identical(reference, run(name, with_masked_rows(ds, "nan")), f"{name}, new items, masked rows nan")


@pytest.mark.parametrize("imputation", ["mean", "zero"])
def test_imputed_input_hides_masked_rows(tiny, imputation):
    """What a model receives: masked rows hold the mean of the observed rows (or zeros), whatever the file held."""
    ds = tiny["missing"]
    reference = ModelInput.from_dataset(ds, imputation)
    for fill in ("nan", "huge"):
        data = ModelInput.from_dataset(with_masked_rows(ds, fill), imputation)
        for j, m in enumerate(ds.modalities):
            assert torch.equal(data.features[m], reference.features[m]), (m, fill)
            x = data.features[m].double().numpy()
            obs = ds.observed[:, j]
            np.testing.assert_array_equal(x[obs], ds.features[m][obs])
            fill_row = ds.features[m][obs].mean(0) if imputation == "mean" else np.zeros(x.shape[1])
            np.testing.assert_allclose(x[~obs], np.broadcast_to(fill_row, x[~obs].shape), rtol=1e-5)
