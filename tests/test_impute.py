"""Imputation strategies against hand-computed values, and every model training under each strategy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import dgmrec.data.impute as impute_mod
from dgmrec.data.dataset import RecDataset
from dgmrec.data.impute import IMPUTATIONS, FeatureOptions, cooccurrence_neighbours, impute_features, prepare_features
from dgmrec.data.synthetic import make_synthetic
from dgmrec.errors import ConfigError
from dgmrec.experiments.retrieval import cross_modal_retrieval
from dgmrec.models import available_models
from dgmrec.training.sampler import NegativeSampler
from model_checks import make_model

NAN = np.nan
# 5 items, modalities a and b (2-d each). Observed: a at items 0, 3, 4; b at items 0, 1, 4; item 2 has none.
A = np.array([[2, 0], [NAN, NAN], [NAN, NAN], [0, 2], [1, 1]], dtype=np.float32)
B = np.array([[1, 0], [1, 0.1], [NAN, NAN], [NAN, NAN], [0, 1]], dtype=np.float32)
OBS = np.array([[1, 1], [0, 1], [0, 0], [1, 0], [1, 1]], dtype=bool)
# a chain 0-1-2-3-4 of co-interactions; users 0 and 4 both link items 0 and 1 (weight 2)
CHAIN = np.array([[0, 0], [0, 1], [1, 1], [1, 2], [2, 2], [2, 3], [3, 3], [3, 4], [4, 0], [4, 1]])


def chain_train() -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(len(CHAIN)), (CHAIN[:, 0], CHAIN[:, 1])), shape=(5, 5))


def feats() -> dict[str, np.ndarray]:
    return {"a": A.copy(), "b": B.copy()}


def run(strategy: str, features: dict[str, np.ndarray] | None = None, **kw: object) -> dict[str, np.ndarray]:
    return impute_features(features or feats(), OBS, strategy, train=chain_train(), **kw)


def test_zero_and_mean_by_hand():
    z = run("zero")
    np.testing.assert_array_equal(z["a"][[1, 2]], 0.0)
    m = run("mean")
    np.testing.assert_allclose(m["a"][[1, 2]], [[1, 1], [1, 1]])  # mean of a over items 0, 3, 4
    np.testing.assert_allclose(m["b"][[2, 3]], [[2 / 3, 1.1 / 3]] * 2, rtol=1e-6)
    # new-item setting: item 0 is new, so a's mean comes from items 3 and 4 only
    ref = np.array([False, True, True, True, True])
    np.testing.assert_allclose(run("mean", reference_items=ref)["a"][1], [0.5, 1.5])


def test_nn_by_hand():
    one = run("nn", k=1)
    # item 1 (missing a) is closest to item 0 in b among the donors {0, 4}; item 3 (missing b) to item 4 in a
    np.testing.assert_allclose(one["a"][1], A[0])
    np.testing.assert_allclose(one["b"][3], B[4])
    # item 2 observes nothing: the mean
    np.testing.assert_allclose(one["a"][2], [1, 1])
    np.testing.assert_allclose(one["b"][2], [2 / 3, 1.1 / 3], rtol=1e-6)
    two = run("nn", k=2)
    np.testing.assert_allclose(two["a"][1], (A[0] + A[4]) / 2)
    # donors come from the reference items only
    ref = np.array([False, True, True, True, True])
    np.testing.assert_allclose(run("nn", k=1, reference_items=ref)["a"][1], A[4])


def test_nn_averages_the_imputations_of_each_observed_modality():
    # item 0 misses m and observes s and t; its nearest donor is item 1 in s and item 2 in t
    s = np.array([[1, 0], [1, 0.1], [0, 1]], dtype=np.float32)
    t = np.array([[0, 1], [1, 0], [0.1, 1]], dtype=np.float32)
    m = np.array([[9, 9], [2, 0], [0, 4]], dtype=np.float32)
    obs = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=bool)
    out = impute_features({"s": s, "t": t, "m": m}, obs, "nn", k=1)
    np.testing.assert_allclose(out["m"][0], [1, 2])


def test_cooccurrence_neighbours_by_hand():
    g = cooccurrence_neighbours(chain_train(), k=2).toarray()
    expected = np.array([[0, 2, 0, 0, 0], [2, 0, 1, 0, 0], [0, 1, 0, 1, 0], [0, 0, 1, 0, 1], [0, 0, 0, 1, 0]])
    np.testing.assert_array_equal(g, expected)
    g1 = cooccurrence_neighbours(chain_train(), k=1).toarray()
    # item 1 keeps its heavier neighbour 0; item 2's tie (1 and 3) goes to the lower id
    assert g1[1].nonzero()[0].tolist() == [0] and g1[2].nonzero()[0].tolist() == [1]


def test_cooccurrence_blocks_match_the_dense_product(monkeypatch):
    rng = np.random.default_rng(0)
    ui = sp.csr_matrix((rng.random((30, 25)) < 0.2).astype(np.float32))
    dense = (ui.T @ ui).toarray()
    np.fill_diagonal(dense, 0)
    whole = cooccurrence_neighbours(ui, k=25).toarray()
    np.testing.assert_array_equal(whole, dense)
    monkeypatch.setattr(impute_mod, "_BLOCK_PATHS", 7)  # many small row blocks
    np.testing.assert_array_equal(cooccurrence_neighbours(ui, k=3).toarray(), _topk_dense(dense, 3))


def _topk_dense(dense: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(dense)
    for i, row in enumerate(dense):
        order = sorted((j for j in range(len(row)) if row[j] > 0), key=lambda j: (-row[j], j))[:k]
        out[i, order] = row[order]
    return out


def test_graph_propagation_by_hand():
    # a: observed 0, 3, 4; missing 1 (neighbours 0 with weight 2, 2) and 2 (neighbours 1, 3)
    s1 = run("graph", k=2, steps=1)
    np.testing.assert_allclose(s1["a"][1], A[0])  # item 2 holds no value yet
    np.testing.assert_allclose(s1["a"][2], A[3])
    s2 = run("graph", k=2, steps=2)
    np.testing.assert_allclose(s2["a"][1], (2 * A[0] + A[3]) / 3, rtol=1e-6)
    np.testing.assert_allclose(s2["a"][2], (A[0] + A[3]) / 2)
    s3 = run("graph", k=2, steps=3)
    np.testing.assert_allclose(s3["a"][1], (2 * A[0] + (A[0] + A[3]) / 2) / 3, rtol=1e-6)
    np.testing.assert_allclose(s3["a"][2], ((2 * A[0] + A[3]) / 3 + A[3]) / 2, rtol=1e-6)
    # b: observed 0, 1, 4; missing 2 and 3
    np.testing.assert_allclose(s2["b"][2], (B[1] + B[4]) / 2, rtol=1e-6)
    np.testing.assert_allclose(s2["b"][3], (B[1] + B[4]) / 2, rtol=1e-6)


def test_graph_rows_never_reached_take_the_mean():
    # items 0-1 and 2-3 are two components; a is observed at 0 and 3 only: 1 and 2 are reached, 4 has no edge
    pairs = np.array([[0, 0], [0, 1], [1, 2], [1, 3]])
    train = sp.csr_matrix((np.ones(4), (pairs[:, 0], pairs[:, 1])), shape=(2, 5))
    a = np.array([[1, 0], [NAN, NAN], [NAN, NAN], [0, 3], [NAN, NAN]], dtype=np.float32)
    obs = np.array([True, False, False, True, False])[:, None]
    out = impute_features({"a": a}, obs, "graph", train=train, k=5, steps=10)["a"]
    np.testing.assert_allclose(out, [[1, 0], [1, 0], [0, 3], [0, 3], [0.5, 1.5]])
    # one step does not cross from item 3 to item 1 in the chain either: those rows keep the mean
    chain = impute_features({"a": A.copy()}, OBS[:, :1], "graph", train=chain_train(), k=2, steps=1)["a"]
    np.testing.assert_allclose(chain[1], A[0])


@pytest.mark.parametrize("strategy", IMPUTATIONS)
def test_observed_rows_kept_and_masked_values_never_read(strategy):
    clean = run(strategy, k=2, steps=3)
    for name, x in feats().items():
        j = "ab".index(name)
        np.testing.assert_array_equal(clean[name][OBS[:, j]], x[OBS[:, j]])
        assert np.isfinite(clean[name]).all()
    for garbage in (0.0, 1e6, -3.0):
        filled = {k: np.where(np.isnan(v), garbage, v).astype(np.float32) for k, v in feats().items()}
        out = run(strategy, filled, k=2, steps=3)
        for name in clean:
            np.testing.assert_array_equal(out[name], clean[name])


@pytest.mark.parametrize("strategy", ["mean", "nn", "graph"])
def test_new_items_give_no_statistics(strategy):
    """Changing a new item's observed features changes no other item's imputation."""
    ds = make_synthetic(n_users=50, n_items=40, modalities=(("x", 6), ("y", 5)), interactions_per_user=8,
                        seed=1)
    new = np.zeros(40, dtype=bool)
    new[:8] = True
    keep = ~new[ds.train[:, 1]]
    base = RecDataset(name="t", n_users=50, n_items=40, train=ds.train[keep], valid=ds.valid, test=ds.test,
                      features=ds.features, observed=ds.observed, new_items=new, setting="new-items")
    opts = FeatureOptions(imputation=strategy, k=3, steps=3)
    ref = prepare_features(base, opts)
    shifted = {m: x.copy() for m, x in ds.features.items()}
    for x in shifted.values():
        x[:8] += 50.0
    other = prepare_features(RecDataset(**{**base.__dict__, "features": shifted, "_train_csr": None}), opts)
    for j, m in enumerate(ds.modalities):
        rows = ~new & ~ds.observed[:, j]
        assert rows.any()
        np.testing.assert_allclose(other[m][rows], ref[m][rows], rtol=1e-5)


def test_feature_options_are_validated():
    for key, value in (("missing_imputation", "median"), ("feature_scaling", "minmax"), ("imputation_k", 0),
                       ("imputation_steps", 0)):
        with pytest.raises(ConfigError, match=key) as info:
            FeatureOptions.from_config({key: value})
        assert "\n" not in str(info.value)
    ds = make_synthetic(n_users=30, n_items=20, interactions_per_user=6)
    with pytest.raises(ConfigError, match="missing_imputation"):
        make_model("VBPR", ds, missing_imputation="nearest")


# ------------------------------------------------------------------ every model with every strategy
@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(n_users=40, n_items=30, modalities=(("image", 8), ("text", 6), ("audio", 4)),
                          interactions_per_user=6, seed=5, name="tiny")


def one_step(model_name: str, ds: RecDataset, strategy: str) -> float:
    """Loss of one full-data training step of ``model_name`` built with ``strategy``."""
    model = make_model(model_name, ds, missing_imputation=strategy, imputation_k=3, imputation_steps=2)
    sampler = NegativeSampler(ds.train, ds.n_items, ds.new_items, seed=0)
    model.train()
    model.before_epoch(0)
    batch = next(iter(sampler.epoch(len(ds.train), bool(model.config.get("use_neg_sampling", True)))))
    opt = torch.optim.Adam(model.optimizer_groups(), lr=0.01)
    out = model.loss(batch)
    if out.total.requires_grad:  # as the trainer: a model without parameters takes no step
        out.total.backward()
        opt.step()
    return float(out.total.detach())


@pytest.mark.parametrize("strategy", IMPUTATIONS)
@pytest.mark.parametrize("model_name", available_models())
def test_every_model_trains_with_every_strategy(model_name, strategy, tiny):
    assert np.isfinite(one_step(model_name, tiny, strategy))


# ------------------------------------------------------------------ retrieval next to every strategy
def test_retrieval_reports_every_strategy(small3):
    ds = small3
    truth = {m: np.asarray(ds.features[m]) for m in ds.modalities}
    train = ds.train_matrix()
    nn = impute_features(truth, ds.observed, "nn", train=train, k=10)
    res = cross_modal_retrieval(nn, ds.observed, ds.modalities, truth, strategies=IMPUTATIONS, train=train)
    assert res["methods"] == ["generated", *IMPUTATIONS]
    for level in ("1", "2", "3"):
        summary = res["by_missing_level"][level]
        for method in res["methods"]:
            assert {f"{method}_hit@10", f"{method}_hit@20", f"{method}_rank"} <= set(summary)
        # the nn column is data/impute's nn: the same queries score the same
        assert summary["nn_rank"] == summary["generated_rank"]
        # a zero query ties with every candidate, and ties count against it
        assert summary["zero_hit@20"] == 0.0 and summary["zero_rank"] == 1.0
    one = res["by_missing_level"]["1"]
    # planted signal: neighbours in the observed modalities retrieve better than one shared mean query
    assert one["nn_rank"] < one["mean_rank"] - 0.1
    # items missing every modality: nn falls back to the mean, graph reaches them through co-interactions
    every = res["by_missing_level"]["3"]
    assert every["nn_rank"] == every["mean_rank"] and every["graph_rank"] < every["mean_rank"]
