"""Cold-start evaluation (cold / warm / hybrid splits) and the content-based cold path of new items."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dgmrec import api
from dgmrec.errors import ConfigError
from dgmrec.evaluation.protocol import Evaluator
from dgmrec.losses import ridge_fit, ridge_path
from dgmrec.models.base import cold_demand
from dgmrec.models.coldstart import RIDGE_GRID, ColdStart, ColdStartOptions, _demand_factor, _share_factor
from planted import all_scores, build, fit, make_planted, percentiles

# ------------------------------------------------------------------------------------ evaluation by hand


def test_cold_warm_hybrid_by_hand():
    # 2 users, 6 items; items 4 and 5 are new. User 0 trained on item 0, user 1 on item 1.
    train = sp.csr_matrix(np.array([[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=np.float32))
    new = np.array([0, 0, 0, 0, 1, 1], dtype=bool)
    test = np.array([[0, 2], [0, 5], [1, 4], [1, 5], [1, 3]])
    scores = torch.tensor([[9.0, 1.0, 5.0, 4.0, 3.0, 2.0],    # user 0: 2 > 3 > 4 > 5 (0 is a training item)
                           [0.0, 9.0, 8.0, 1.0, 2.0, 3.0]])  # user 1: 2 > 5 > 4 > 3
    test_new = test[new[test[:, 1]]]
    ev = Evaluator.from_pairs(train, {"test_new_items": test_new, "test_cold": test, "test_warm": test},
                              ks=[1, 2, 5], metrics=["recall", "precision", "ndcg"],
                              candidates={"test_cold": new, "test_warm": ~new})
    hybrid, _ = ev.evaluate(lambda u: scores[u], "test_new_items")
    cold, cold_users = ev.evaluate(lambda u: scores[u], "test_cold")
    warm, warm_users = ev.evaluate(lambda u: scores[u], "test_warm")
    # hybrid: all items ranked, truth on new items: user 0 {5} ranks 4th; user 1 {4, 5}: list [2, 5, 4, 3, 0]
    assert hybrid["recall@1"] == 0.0
    assert hybrid["recall@2"] == pytest.approx((0 + 0.5) / 2)
    assert hybrid["recall@5"] == pytest.approx((1 + 1) / 2)
    # cold: only items 4 and 5 ranked; user 0: [4, 5], truth {5}; user 1: [5, 4], truth {4, 5}
    assert cold_users["recall@1"].tolist() == [0.0, 0.5]
    assert cold["recall@2"] == pytest.approx(1.0)
    # K = 5 is capped at the 2 candidates: the @5 metrics are the @2 ones (precision over 2 slots)
    assert cold["recall@5"] == cold["recall@2"]
    assert cold_users["precision@5"].tolist() == [0.5, 1.0]
    assert cold_users["ndcg@1"].tolist() == [0.0, 1.0]
    assert cold_users["ndcg@5"][0] == pytest.approx((1 / math.log2(3)) / 1.0)
    # warm: items 0..3 ranked; user 0 truth {2} (rank 1, item 0 masked); user 1 truth {3}: list [2, 3, 0]
    assert warm_users["recall@1"].tolist() == [1.0, 0.0]
    assert warm_users["recall@2"].tolist() == [1.0, 1.0]
    assert warm["recall@1"] == pytest.approx(0.5)
    # users without truth in a split are skipped
    assert ev.splits["test_warm"].users.tolist() == [0, 1]
    ev2 = Evaluator.from_pairs(train, {"cold": np.array([[0, 2], [1, 4]])}, ks=[1], candidates={"cold": new})
    assert ev2.splits["cold"].users.tolist() == [1]


def test_trainer_reports_the_three_splits(small3_new, tmp_path):
    res = api.train("VBPR", small3_new, out=tmp_path / "run", overrides={"epochs": 1}, progress=False)
    for split in ("test_new_items", "test_cold", "test_warm"):
        assert set(res[split]) == set(res["test"]), split
        assert (tmp_path / "run" / f"per_user_{split}.csv").is_file()
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["test_cold"] == res["test_cold"]
    ds = small3_new
    cold_users = np.loadtxt(tmp_path / "run" / "per_user_test_cold.csv", delimiter=",", skiprows=1)[:, 0]
    trained_users = np.unique(ds.train[:, 0])
    expected = np.intersect1d(np.unique(ds.test_new_only[:, 0]), trained_users)
    np.testing.assert_array_equal(cold_users, expected)
    warm_pairs = ds.test[~ds.new_items[ds.test[:, 1]]]
    warm_users = np.loadtxt(tmp_path / "run" / "per_user_test_warm.csv", delimiter=",", skiprows=1)[:, 0]
    np.testing.assert_array_equal(warm_users, np.intersect1d(np.unique(warm_pairs[:, 0]), trained_users))
    # a cold list only holds new items: its recall@K is at least the hybrid's (same truth, fewer competitors)
    assert res["test_cold"]["recall@20"] >= res["test_new_items"]["recall@20"]


def test_missing_setting_has_no_cold_splits(small2, tmp_path):
    res = api.train("VBPR", small2, out=tmp_path / "run", overrides={"epochs": 1}, progress=False)
    assert "test_cold" not in res and "test_new_items" not in res


# ------------------------------------------------------------------------------------ the cold path itself


def clusters_case(method: str = "knn", calibration: str = "share", scale: float = 1.0, seed: int = 0,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Users and old items with trained representations that encode 4 clusters; content encodes the cluster
    too. Returns users, completed items, the new mask, the user and item clusters."""
    g = torch.Generator().manual_seed(seed)
    k, d, n_items, n_users = 4, 8, 200, 40
    centers = torch.randn(k, d, generator=g) * 2
    item_cluster = torch.arange(n_items) % k
    user_cluster = torch.arange(n_users) % k
    items = centers[item_cluster] + 0.5 * torch.randn(n_items, d, generator=g)
    users = centers[user_cluster] + 0.5 * torch.randn(n_users, d, generator=g)
    content_centers = torch.randn(k, 6, generator=g)
    feats = [content_centers[item_cluster] + 0.3 * torch.randn(n_items, 6, generator=g),
             torch.randn(n_items, 5, generator=g)]  # the second modality is noise
    observed = torch.ones(n_items, 2, dtype=torch.bool)
    observed[::3, 0] = False  # some items only observe the noise modality
    new = torch.zeros(n_items, dtype=torch.bool)
    new[1::5] = True
    untrained = torch.randn(n_items, d, generator=g) * 0.01  # new items' model rows: tiny, untrained
    items = torch.where(new[:, None], untrained, items)
    cs = ColdStart(ColdStartOptions(method, k=10, ridge=1.0, calibration=calibration, scale=scale), feats,
                   observed, new)
    done = cs.complete(users, items, ~new)
    return users, done, new, user_cluster.numpy(), item_cluster.numpy()


@pytest.mark.parametrize("method", ["knn", "ridge"])
def test_cold_path_ranks_new_items_by_planted_content(method):
    users, items, new, uc, ic = clusters_case(method)
    scores = (users @ items.T).numpy()
    new_np = new.numpy()
    own_cluster = uc[:, None] == ic[None, :]
    content_new = new_np & (np.arange(len(ic)) % 3 != 0)  # observes the informative modality
    # among new items with content, each user's own-cluster items score above the others
    top = [np.argsort(-scores[u, content_new])[:5] for u in range(len(uc))]
    hit = np.mean([own_cluster[u, np.flatnonzero(content_new)[t]].mean() for u, t in enumerate(top)])
    assert hit > 0.75, hit  # chance: 0.25
    # the untouched old rows are the model's
    _, items0, *_ = clusters_case(method, calibration="none")
    torch.testing.assert_close(items[~new], items0[~new])


@pytest.mark.parametrize("calibration", ["share", "spread"])
def test_uncalibrated_rank_new_items_last_calibrated_do_not(calibration):
    def new_share_in_top(items: torch.Tensor, users: torch.Tensor, new: torch.Tensor) -> float:
        top = (users @ items.T).topk(20, dim=1).indices
        return float(new[top].float().mean())

    users, calibrated, new, *_ = clusters_case("knn", calibration)
    _, raw, *_ = clusters_case("knn", "none")
    share = float(new.float().mean())  # 0.2
    assert new_share_in_top(calibrated, users, new) > 0.5 * share
    assert new_share_in_top(raw, users, new) < 0.5 * new_share_in_top(calibrated, users, new)
    # the scale multiplies the generated deviations from the old items' mean
    _, double, *_ = clusters_case("knn", calibration, scale=2.0)
    center = calibrated[~new].mean(0)
    torch.testing.assert_close(double[new] - center, 2 * (calibrated[new] - center), rtol=1e-4, atol=1e-4)


def test_share_factor_by_hand():
    # one user u = (1, 0), center 0; own items score 3, 2, 1 (K = 3 items: threshold 1); trained held-out rows
    # score 2 and 0.5 (one wins); generated rows score 0.25 and 0.1: alpha * 0.25 >= 1 wins from alpha = 4,
    # the second from alpha = 10, so one win is reached first at alpha = 4 (on the grid)
    users = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[3.0, 0.0], [2.0, 1.0], [1.0, 5.0]])
    trained = torch.tensor([[2.0, 0.0], [0.5, 3.0]])
    held = torch.tensor([[0.25, 1.0], [0.1, -2.0]])
    assert _share_factor(users, items, trained, held, torch.zeros(2)) == pytest.approx(4.0)


def test_demand_factor_by_hand():
    # one user u = (1, 0), center 0, K = 2 (3 old + 1 cold item). Old items score 3, 2, 1; item 0 is a training
    # item (masked), so the top 2 old scores are 2, 1. The cold row scores alpha * 0.5: it takes one of the
    # two slots (share 0.5) once alpha * 0.5 > 1, i.e. from alpha = 2; a share of 0.25 is reached just there
    users = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([[3.0, 0.0], [2.0, 1.0], [1.0, 5.0]])
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0]], dtype=np.float32))
    cold = torch.tensor([[0.5, 2.0]])
    alpha = _demand_factor(users, y, seen, torch.arange(3), cold, torch.zeros(2), demand=0.25, top=2)
    assert alpha == pytest.approx(2.0, rel=1e-6)
    # unmasked, the cold row must beat the second best old score (2): from alpha = 4
    alpha = _demand_factor(users, y, sp.csr_matrix((1, 4), dtype=np.float32), torch.arange(3), cold,
                           torch.zeros(2), demand=0.25, top=2)
    assert alpha == pytest.approx(4.0, rel=1e-6)


@pytest.mark.parametrize("demand", [0.05, 0.2, 0.5])
def test_demand_calibration_gives_new_items_the_demanded_share_of_top_lists(demand):
    users, items, new, *_ = clusters_case("ridge")
    seen = sp.random(len(users), len(new), density=0.05, format="csr", random_state=0)
    seen = sp.csr_matrix(seen.multiply(~new.numpy()[None, :]))  # users trained on old items only
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(len(new), 6, generator=g), torch.randn(len(new), 5, generator=g)]
    observed = torch.ones(len(new), 2, dtype=torch.bool)
    untrained = torch.where(new[:, None], 0.01 * torch.randn(items.shape, generator=g), items)
    cs = ColdStart(ColdStartOptions("ridge", calibration="demand"), feats, observed, new, demand=demand, seen=seen)
    done = cs.complete(users, untrained, ~new)
    scores = users @ done.T
    scores[torch.as_tensor(seen.toarray() > 0)] = -float("inf")  # the evaluation's mask
    got = float(new[scores.topk(20, dim=1).indices].float().mean())  # brute force, all items ranked
    assert abs(got - demand) <= 0.02, (got, demand)


def test_demand_without_a_demand_is_share():
    # clusters_case builds its ColdStart without a demand (as in the missing setting, or without validation
    # pairs on new items): "demand" then calibrates as "share"
    _, share_items, *_ = clusters_case("ridge", calibration="share")
    _, demand_items, *_ = clusters_case("ridge", calibration="demand")
    _, spread_items, *_ = clusters_case("ridge", calibration="spread")
    torch.testing.assert_close(demand_items, share_items)
    assert not torch.allclose(spread_items, share_items)


def test_cold_demand_is_the_validation_share_of_new_items(small3_new):
    ds = small3_new
    expected = float(np.mean([ds.new_items[i] for i in ds.valid[:, 1]]))
    assert 0 < expected < 1 and cold_demand(ds) == pytest.approx(expected)
    assert cold_demand(dataclasses.replace(ds, valid=ds.valid[~ds.new_items[ds.valid[:, 1]]])) is None
    assert cold_demand(dataclasses.replace(ds, new_items=None, setting="missing")) is None


def test_knn_is_the_mean_of_the_nearest_old_items_by_hand():
    # 1 modality, items 0..3 old, item 4 new; its content equals item 0's and is near item 1's
    feats = [torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.2], [-0.8, -1.0], [1.0, 0.0]])]
    observed = torch.ones(5, 1, dtype=torch.bool)
    new = torch.tensor([False, False, False, False, True])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [7.0, 7.0], [0.0, 0.0]])
    cs = ColdStart(ColdStartOptions("knn", k=2, calibration="none"), feats, observed, new)
    out = cs.complete(torch.eye(2), items, ~new)
    torch.testing.assert_close(out[4], torch.tensor([0.5, 0.5]))
    # an item with no modality in common with any old item takes the mean of the old items with its pattern
    observed2 = torch.tensor([[True], [True], [False], [False], [False]])
    cs2 = ColdStart(ColdStartOptions("knn", k=2, calibration="none"), feats, observed2, new)
    torch.testing.assert_close(cs2.complete(torch.eye(2), items, ~new)[4], torch.tensor([6.0, 6.0]))


def test_reference_default_leaves_scores_untouched(small3_new):
    ref = build("VBPR", small3_new, seed=1)
    explicit = build("VBPR", small3_new, seed=1, cold_start="none")
    np.testing.assert_array_equal(all_scores(ref), all_scores(explicit))


def test_cold_start_options_are_checked(small3_new):
    with pytest.raises(ConfigError, match="cold_start"):
        build("VBPR", small3_new, cold_start="magic")
    with pytest.raises(ConfigError, match="cold_start_k"):
        build("VBPR", small3_new, cold_start="knn", cold_start_k=0)
    with pytest.raises(ConfigError, match="no cold-start path"):
        build("LightGCN", small3_new, cold_start="knn")


@pytest.mark.parametrize("model", ["DGMRec", "VBPR"])
def test_trained_model_cold_path_beats_chance(model):
    planted = make_planted(new_per_group=2, users_per_cluster=20, seed=5)
    ds = planted.ds
    new = ds.new_items
    pairs = ds.test_new_only[planted.group[ds.test_new_only[:, 1]] < 3]  # new items observing some modality
    net = build(model, ds, seed=0, cold_start="knn")
    fit(net, ds, epochs=15, lr=0.01)
    scores = all_scores(net, epoch=14)
    cold = percentiles(-scores, ds.train_matrix(), pairs, among=new).mean()  # share of candidates ranked below
    hybrid = percentiles(-scores, ds.train_matrix(), pairs).mean()
    assert cold > 0.75, (cold, hybrid)  # chance 0.5: new items of the user's cluster rank high among new items
    assert hybrid > 0.6, (cold, hybrid)  # and are not ranked below every old item


@pytest.mark.parametrize("method", ["knn", "ridge"])
def test_added_items_reuse_the_fitted_map_and_factor(method, monkeypatch):
    """A service adds items one request at a time: completing again after an addition fits nothing anew and
    gives the rows a fresh completion gives; new representations (after training) are fitted again."""
    import dgmrec.models.coldstart as cs_module

    g = torch.Generator().manual_seed(3)
    n, d = 120, 6
    users = torch.randn(30, d, generator=g)
    items = torch.randn(n, d, generator=g)
    feats = [torch.randn(n, 5, generator=g), torch.randn(n, 4, generator=g)]
    observed = torch.ones(n, 2, dtype=torch.bool)
    new = torch.zeros(n, dtype=torch.bool)
    new[::6] = True
    added = [torch.randn(3, 5, generator=g), torch.randn(3, 4, generator=g)]
    added_obs = torch.tensor([[True, False], [True, True], [False, True]])

    def fresh() -> ColdStart:
        return ColdStart(ColdStartOptions(method, k=5, calibration="share"), feats, observed, new)

    calls = {"fits": 0, "factors": 0}
    real_ridge, real_share = cs_module.ridge_fit, cs_module._share_factor
    monkeypatch.setattr(cs_module, "ridge_fit", lambda *a, **k: calls.__setitem__("fits", calls["fits"] + 1)
                        or real_ridge(*a, **k))
    monkeypatch.setattr(cs_module, "_share_factor", lambda *a, **k: calls.__setitem__("factors", calls["factors"] + 1)
                        or real_share(*a, **k))
    cs = fresh()
    cs.complete(users, items, ~new)
    before = dict(calls)
    cs.add(added, added_obs)
    incremental = cs.complete(users, items, ~new)
    assert calls == before  # nothing fitted again
    once = fresh()
    once.add(added, added_obs)
    torch.testing.assert_close(incremental, once.complete(users, items, ~new))
    # other representations (the model trained on): map and factor are fitted again
    before = dict(calls)
    cs.complete(users, items * 1.5, ~new)
    assert calls["factors"] == before["factors"] + 1


def test_ridge_path_equals_ridge_fit_for_every_strength():
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(40, 6, generator=g), torch.randn(40, 3, generator=g)
    strengths = [0.0, 0.5, 30.0]
    for (w, b), ridge in zip(ridge_path(z, y, strengths), strengths, strict=True):
        w_ref, b_ref = ridge_fit(z, y, ridge)
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6)


def test_ridge_path_in_kernel_form_equals_ridge_fit():
    # fewer rows than columns: the path decomposes the n x n kernel matrix instead of the Gram matrix
    g = torch.Generator().manual_seed(5)
    z, y = torch.randn(12, 30, generator=g), torch.randn(12, 3, generator=g)
    for (w, b), ridge in zip(ridge_path(z, y, [0.5, 30.0]), [0.5, 30.0], strict=True):
        w_ref, b_ref = ridge_fit(z, y, ridge)
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("signal", "allowed"), [(1.0, RIDGE_GRID[:1]), (0.0, RIDGE_GRID[-4:])])
def test_auto_ridge_follows_how_much_the_content_predicts(signal, allowed):
    # old items' representations are a linear map of their content (signal 1, no noise: the weakest penalty
    # predicts held-out items best) or unrelated to it (signal 0: a strong penalty, towards the mean)
    g = torch.Generator().manual_seed(4)
    n, d = 200, 4
    feats = [torch.randn(n, 8, generator=g)]
    observed = torch.ones(n, 1, dtype=torch.bool)
    new = torch.zeros(n, dtype=torch.bool)
    new[::10] = True
    content = ColdStart(ColdStartOptions("ridge"), feats, observed, new).content.design(torch.arange(n))
    items = signal * content @ torch.randn(content.shape[1], d, generator=g) \
        + (1 - signal) * torch.randn(n, d, generator=g)
    users = torch.randn(30, d, generator=g)
    cs = ColdStart(ColdStartOptions("ridge", ridge=None, calibration="none"), feats, observed, new)
    out = cs.complete(users, items, ~new)
    assert cs.ridge in allowed
    fixed = ColdStart(ColdStartOptions("ridge", ridge=cs.ridge, calibration="none"), feats, observed, new)
    torch.testing.assert_close(out, fixed.complete(users, items, ~new))


def test_auto_ridge_is_a_configuration_value(small3_new):
    model = build("VBPR", small3_new, cold_start="ridge", cold_start_ridge="auto")
    assert model.cold_start is not None and model.cold_start.options.ridge is None
    with pytest.raises(ConfigError, match="cold_start_ridge"):
        build("VBPR", small3_new, cold_start="ridge", cold_start_ridge="often")
    with pytest.raises(ConfigError, match="cold_start_ridge"):
        build("VBPR", small3_new, cold_start="ridge", cold_start_ridge=-1.0)
