"""VBPR, SLMRec and BM3: the model contract on 2 and 3 modalities, plus hand-checked formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgmrec.config import resolve_config
from dgmrec.errors import ConfigError
from dgmrec.graphs import lightgcn_propagate
from dgmrec.losses import bpr_loss, in_batch_softmax_ce, negative_cosine
from dgmrec.models.base import Batch
from dgmrec.models.slmrec import fac_chain
from dgmrec.models.vbpr import select_modalities
from model_checks import (
    check_beats_popularity,
    check_contract,
    check_deterministic,
    check_loss_decreases,
    check_shapes,
    make_model,
)

MODELS = ["VBPR", "SLMRec", "BM3"]


def _batch(ds, n: int = 64, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(ds.train), (n,), generator=g)
    pairs = torch.as_tensor(ds.train[rows.numpy()])
    neg = torch.randint(ds.n_items, (n,), generator=g)
    return Batch(pairs[:, 0], pairs[:, 1], neg)


# --------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("data", ["small2", "small3"])
def test_contract(name, data, request):
    ds = request.getfixturevalue(data)
    check_contract(name, ds, n_epochs=6)


@pytest.mark.parametrize(("name", "lr"), [("VBPR", 0.005), ("SLMRec", 0.005), ("BM3", 0.01)])
def test_beats_popularity(name, lr, small3, tmp_path):
    check_beats_popularity(name, small3, tmp_path, epochs=25, learning_rate=lr)


@pytest.mark.parametrize("name", MODELS)
def test_deterministic(name, small2, tmp_path):
    check_deterministic(name, small2, tmp_path, epochs=2)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dataset", ["baby", "sports", "clothing", "tiktok"])
def test_shipped_configs_resolve(name, dataset):
    cfg, layers = resolve_config(name, dataset)
    assert f"models/{name}" in layers
    assert float(cfg["learning_rate"]) > 0


def test_scores_deterministic_and_cached(small3):
    for name in MODELS:
        model = make_model(name, small3)
        model.eval()
        with torch.no_grad():
            model.prepare_eval()
            a = model.score_users(torch.arange(5))
            model.prepare_eval()
            b = model.score_users(torch.arange(5))
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------ shared losses
def test_in_batch_softmax_ce_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    k = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 0.0]])
    tau = 0.5
    logits = (q @ k.T).numpy() / tau

    def ce(i: int) -> float:
        return -logits[i, i] + math.log(np.exp(logits[i]).sum())

    assert in_batch_softmax_ce(q, k, tau).item() == pytest.approx(np.mean([ce(0), ce(1), ce(2)]), rel=1e-6)
    rows = torch.tensor([False, True, True])
    assert in_batch_softmax_ce(q, k, tau, rows).item() == pytest.approx((ce(1) + ce(2)) / 2, rel=1e-6)
    qg = q.clone().requires_grad_(True)
    empty = in_batch_softmax_ce(qg, k, tau, torch.zeros(3, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(qg.grad, torch.zeros_like(q))


def test_negative_cosine_hand_computed():
    online = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]], requires_grad=True)
    # cosines 1, 0, 0 (zero target row)
    loss = negative_cosine(online, target)
    assert loss.item() == pytest.approx(1.0 - 1.0 / 3.0)
    loss.backward()
    assert target.grad is None  # stop-gradient target
    assert negative_cosine(online, target, torch.tensor([True, False, False])).item() == pytest.approx(0.0)
    assert negative_cosine(online, target, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    # the gradient through the online side is that of torch's cosine similarity
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, generator=rng, requires_grad=True)
    b = torch.randn(5, 4, generator=rng)
    negative_cosine(a, b).backward()
    ref = a.detach().clone().requires_grad_(True)
    (1.0 - torch.nn.functional.cosine_similarity(ref, b, dim=-1).mean()).backward()
    assert torch.allclose(a.grad, ref.grad, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- VBPR
def test_vbpr_modality_selection(small2, small3):
    assert select_modalities("reference", ["image", "text"]) == [1]
    assert select_modalities("reference", ["image", "audio"]) == [1]
    assert select_modalities("all", ["image", "text", "audio"]) == [0, 1, 2]
    assert select_modalities("audio, image", ["image", "text", "audio"]) == [2, 0]
    with pytest.raises(ConfigError):
        select_modalities("sound", ["image", "text"])
    ref = make_model("VBPR", small3)
    assert ref.used_modalities == ["text"]
    assert ref.item_linear.in_features == small3.features["text"].shape[1]
    full = make_model("VBPR", small3, vbpr_modalities="all")
    assert full.item_linear.in_features == sum(x.shape[1] for x in small3.features.values())


def test_vbpr_loss_formula(small2):
    model = make_model("VBPR", small2, reg_weight=0.3)
    batch = _batch(small2)
    table = torch.cat([model.item_embedding, model.content @ model.item_linear.weight.T + model.item_linear.bias], 1)
    u, p, n = model.user_embedding[batch.users], table[batch.pos], table[batch.neg]
    expected = bpr_loss((u * p).sum(1), (u * n).sum(1)) + 0.3 * (u.norm() + p.norm() + n.norm()) / len(u)
    assert model.loss(batch).total.item() == pytest.approx(expected.item(), rel=1e-5)
    model.eval()
    model.prepare_eval()
    assert torch.allclose(model.score_users(batch.users[:3]), u[:3] @ table.T, atol=1e-5)


# -------------------------------------------------------------------------------------------------- SLMRec
def test_slmrec_fac_chain_and_rows(small2, small3):
    assert fac_chain("reference", 3) == [0, None, 1]
    assert fac_chain("all", 3) == [0, 1, 2]
    m2, m3 = make_model("SLMRec", small2), make_model("SLMRec", small3)
    assert m2.fac_rows == "missing" and m3.fac_rows == "all"
    assert [lin.out_features for lin in m2.chain] == [64, 64, 32]
    assert sorted(m2.stage_heads) == ["0", "2"]
    full = make_model("SLMRec", small3, slmrec_fac_modalities="all")
    assert sorted(full.stage_heads) == ["0", "1", "2"]
    with pytest.raises(ConfigError):
        make_model("SLMRec", small2, slmrec_fac_rows="some")


def test_slmrec_stacked_propagation_equals_separate_views(small3):
    model = make_model("SLMRec", small3)
    with torch.no_grad():
        stacked = model.propagate()
        views = [model.item_embedding] + [model.dense[j](model.features(j)) for j in range(model.M)]
        for v, view in enumerate(views):
            alone = lightgcn_propagate(model.adj, torch.cat([model.user_embedding, view]), model.n_layers)
            assert torch.allclose(stacked[:, v * 64:(v + 1) * 64], alone, atol=1e-5)
    # features are row-normalised copies of the imputed tables
    assert torch.allclose(model.features(0).norm(dim=1), torch.ones(small3.n_items), atol=1e-5)


def test_slmrec_fac_missing_rows_by_hand(small2):
    model = make_model("SLMRec", small2)
    batch = _batch(small2, n=48)
    with torch.no_grad():
        h = model.propagate()[model.n_users:][batch.pos]
        got = model.fac_loss(h, batch.pos)
        ident, first, second = h.split(64, dim=1)[0], h.split(64, dim=1)[1], h.split(64, dim=1)[2]
        obs = torch.as_tensor(small2.observed)[batch.pos]
        s1 = model.chain[0](ident)
        e1 = model.stage_heads["0"](first)
        s3 = model.chain[2](model.chain[1](s1))
        e3 = model.stage_heads["2"](second)
        expected = 0.0
        for s, e, miss in ((s1, e1, ~obs[:, 0]), (s3, e3, ~obs[:, 1])):
            logits = s @ e.T / model.ssl_temp
            idx = torch.nonzero(miss).squeeze(1)
            expected += F.cross_entropy(logits[idx], idx).item()
    assert got.item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- BM3
def test_bm3_zero_proj_blocks_missing_rows(small2):
    model = make_model("BM3", small2)
    assert model.mask_mode == "zero_proj"
    batch = _batch(small2, n=200)
    model.loss(batch).total.backward()
    obs = torch.as_tensor(small2.observed)
    in_batch = torch.zeros(small2.n_items, dtype=torch.bool)
    in_batch[batch.pos] = True
    for j in range(2):
        grad_rows = model.features[j].grad.abs().sum(1) > 0
        assert not grad_rows[~obs[:, j]].any()
        assert grad_rows[obs[:, j] & in_batch].all()


def test_bm3_mask_modes(small2, small3):
    assert make_model("BM3", small3).mask_mode == "none"
    batch = _batch(small2, n=200)
    model = make_model("BM3", small2, bm3_mask_mode="exclude_rows", dropout=0.0)
    parts = model.loss(batch).parts
    # with no dropout, excluded rows change only the modality term; compute it by hand
    with torch.no_grad():
        i = model.propagate()[1][batch.pos]
        obs = torch.as_tensor(small2.observed)[batch.pos]
        cl = 0.0
        for j in range(2):
            f = model.projections[j](model.features[j][batch.pos])
            pf = model.predictor(f)
            keep = obs[:, j]
            cl += float(2 - F.cosine_similarity(pf, i)[keep].mean() - F.cosine_similarity(pf, f)[keep].mean())
    assert parts["cl"] == pytest.approx(2.0 * cl, rel=1e-5)
    with pytest.raises(ConfigError):
        make_model("BM3", small2, bm3_mask_mode="drop")


def test_bm3_new_items_start_and_stay_zero(small3):
    from dgmrec.data.masks import draw_new_items
    from dgmrec.data.mmrec import make_new_item_split

    counts = np.bincount(small3.train[:, 1], minlength=small3.n_items)
    ds = make_new_item_split(small3, draw_new_items(counts, seed=1))
    model = make_model("BM3", ds)
    new = torch.as_tensor(ds.new_items)
    assert new.any() and torch.equal(model.item_embedding[new], torch.zeros(int(new.sum()), 64))
    check_loss_decreases(model, ds, n_epochs=2)
    assert torch.equal(model.item_embedding[new], torch.zeros(int(new.sum()), 64))
    check_shapes(model, ds)
