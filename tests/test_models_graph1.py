"""Graph baselines MMGCN, GRCN, LATTICE and MGCN: model contract on 2 and 3 modalities, every departure option,
the new-item setting, and hand-checked pieces (edge softmax, edge-list products, differentiable kNN, isolation)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dgmrec.graphs import sym_row_normalize
from dgmrec.models.grcn import EdgeGraph, attention_pass, segment_softmax
from dgmrec.models.lattice import edge_sym_row_normalize, edge_weighted_sum, knn_edges_with_grad
from dgmrec.training.sampler import NegativeSampler
from model_checks import (
    check_beats_popularity,
    check_contract,
    check_deterministic,
    check_loss_decreases,
    check_shapes,
    make_model,
)

MODELS = ["MMGCN", "GRCN", "LATTICE", "MGCN"]

# every departure option away from its default (the defaults are covered by the contract tests)
OPTIONS = [
    ("MMGCN", {"mmgcn_train_id": True, "mmgcn_conv_mode": "plain", "use_stale_cache": True}),
    ("MMGCN", {"mmgcn_conv_mode": "bias_norm", "mmgcn_latent_dims": {}}),
    ("GRCN", {"grcn_route_to_users": True, "n_layers": 2, "use_stale_cache": True, "reg_weight": 0.001}),
    ("LATTICE", {"lattice_infer_normalize_learned": True, "lattice_modal_weight_init": [0.3, 0.3, 0.4],
                 "reg_weight": 0.001}),
]


def one_batch(ds):
    sampler = NegativeSampler(ds.train, ds.n_items, ds.new_items, seed=0)
    return next(iter(sampler.epoch(len(ds.train), True)))


# ------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("data", ["small2", "small3"])
def test_contract(name, data, request):
    ds = request.getfixturevalue(data)
    check_contract(name, ds, n_epochs=3)


@pytest.mark.parametrize(("name", "options"), OPTIONS)
def test_options(name, options, small3):
    check_contract(name, small3, n_epochs=3, **options)


@pytest.mark.parametrize("name", MODELS)
def test_new_item_setting(name, small3_new):
    check_shapes(make_model(name, small3_new), small3_new)
    check_loss_decreases(make_model(name, small3_new), small3_new, n_epochs=3)


@pytest.mark.parametrize("name", MODELS)
def test_beats_popularity(name, small3, tmp_path):
    check_beats_popularity(name, small3, tmp_path, epochs=12, learning_rate=0.01)


@pytest.mark.parametrize("name", MODELS)
def test_deterministic(name, small2, tmp_path):
    check_deterministic(name, small2, tmp_path, epochs=2)


def test_prepare_eval_is_deterministic(small3):
    for name in MODELS:
        model = make_model(name, small3)
        model.eval()
        users = torch.arange(9)
        model.prepare_eval()
        a = model.score_users(users)
        model.prepare_eval()
        assert torch.equal(a, model.score_users(users)), name


# ------------------------------------------------------------- edge-list pieces of GRCN and LATTICE


def test_segment_softmax_hand_computed():
    scores = torch.tensor([0.0, np.log(3.0), 5.0, 1.0, 1.0], requires_grad=True)
    index = torch.tensor([0, 0, 2, 1, 1])
    out = segment_softmax(scores, index, 4)  # segment 3 is empty
    np.testing.assert_allclose(out.detach().numpy(), [0.25, 0.75, 1.0, 0.5, 0.5], atol=1e-6)
    (out * torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])).sum().backward()
    # d p0 / d s0 = p0 (1 - p0), d p0 / d s1 = -p0 p1; other segments untouched
    np.testing.assert_allclose(scores.grad.numpy(), [0.1875, -0.1875, 0.0, 0.0, 0.0], atol=1e-6)


def test_edge_products_match_dense():
    gen = torch.Generator().manual_seed(0)
    n, e = 30, 120
    src = torch.randint(0, n, (e,), generator=gen)
    dst = torch.randint(0, n, (e,), generator=gen)
    x = torch.randn(n, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(e, dtype=torch.float64, generator=gen, requires_grad=True)
    dense = torch.zeros(n, n, dtype=torch.float64).index_put((dst, src), w, accumulate=True)
    np.testing.assert_allclose(edge_weighted_sum(x, src, dst, w, n).detach(), (dense @ x).detach(), atol=1e-12)
    graph = EdgeGraph(src, dst, n, chunk_size=17)
    np.testing.assert_allclose(graph.propagate(w, x).detach(), (dense @ x).detach(), atol=1e-12)
    np.testing.assert_allclose(graph.edge_dot(x, x).detach(), (x[dst] * x[src]).sum(1).detach(), atol=1e-12)
    assert torch.autograd.gradcheck(lambda w_, x_: graph.propagate(w_, x_), (w, x))
    y = torch.randn(n, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: graph.edge_dot(a, b), (x, y))


def test_edge_sym_row_normalize_matches_scipy():
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    cols = torch.tensor([0, 1, 1, 0, 2, 2])  # a duplicate (2, 2) pair adds up
    vals = torch.tensor([1.0, 0.5, 2.0, 0.25, 1.0, 0.5])
    got = torch.zeros(3, 3).index_put((rows, cols), edge_sym_row_normalize(rows, cols, vals, 3), accumulate=True)
    expect = sym_row_normalize(sp.csr_matrix((vals.numpy(), (rows.numpy(), cols.numpy())), shape=(3, 3)))
    np.testing.assert_allclose(got.numpy(), expect.toarray(), atol=1e-6)


def test_knn_edges_with_grad_matches_dense_topk():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(25, 4, generator=gen, dtype=torch.float64)
    x1 = x.clone().requires_grad_(True)
    rows, cols, vals = knn_edges_with_grad(x1, 4, chunk_size=6)
    # dense reference: full cosine matrix, top-k per row with the values gathered from it
    x2 = x.clone().requires_grad_(True)
    xn = x2 / x2.norm(dim=1, keepdim=True)
    sim = xn @ xn.T
    top_v, top_i = sim.topk(4, dim=1)
    got = torch.zeros(25, 25, dtype=torch.float64).index_put((rows, cols), vals)
    ref = torch.zeros(25, 25, dtype=torch.float64).scatter(1, top_i, top_v)
    np.testing.assert_allclose(got.detach(), ref.detach(), atol=1e-6)
    weight = torch.randn(25, 25, generator=gen, dtype=torch.float64)
    (got * weight).sum().backward()
    (ref * weight).sum().backward()
    np.testing.assert_allclose(x1.grad, x2.grad, atol=1e-6)


# ---------------------------------------------------------------------------------------- model pieces


def test_grcn_attention_pass_hand_computed():
    # three nodes, edges 1 -> 0 and 2 -> 0: node 0 attends to its sources by softmax of the dot products
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    graph = EdgeGraph(torch.tensor([1, 2]), torch.tensor([0, 0]), 3)
    agg, alpha = attention_pass(x, graph)
    e = np.e
    np.testing.assert_allclose(alpha.numpy(), [e / (e + 1), 1 / (e + 1)], atol=1e-6)
    np.testing.assert_allclose(agg.numpy(), [[e / (e + 1), 1 / (e + 1)], [0, 0], [0, 0]], atol=1e-6)


def test_grcn_reference_routing_is_independent_of_n_layers(small2):
    a = make_model("GRCN", small2, n_layers=1)
    b = make_model("GRCN", small2, n_layers=3)
    with torch.no_grad():
        assert torch.equal(a.forward_all(), b.forward_all())
        c = make_model("GRCN", small2, n_layers=2, grcn_route_to_users=True)
        assert not torch.allclose(a.forward_all(), c.forward_all())


def test_mmgcn_frozen_tables_are_buffers(small2):
    frozen = make_model("MMGCN", small2)
    names = {n for n, _ in frozen.named_parameters()}
    assert "id_embedding" not in names and not any("preference" in n for n in names)
    assert "id_embedding" in frozen.state_dict()  # kept in checkpoints (random, not rebuilt from data)
    trained = make_model("MMGCN", small2, mmgcn_train_id=True)
    names = {n for n, _ in trained.named_parameters()}
    assert "id_embedding" in names and sum("preference" in n for n in names) == 2
    # the image branch has the 256-d front-end, the text branch runs on raw features
    assert frozen.branches[0].front is not None and frozen.branches[0].preference.shape[1] == 256
    text_width = small2.features["text"].shape[1]
    assert frozen.branches[1].front is None and frozen.branches[1].preference.shape[1] == text_width
    # auto conv mode: bias + normalisation for two modalities only
    assert frozen.branches[0].bias_norm and frozen.branches[0].conv_bias is not None


def test_mmgcn_auto_conv_mode_is_plain_for_three_modalities(small3):
    model = make_model("MMGCN", small3)
    assert all(not b.bias_norm and b.conv_bias is None for b in model.branches)


def test_lattice_learns_graph_only_on_first_batch(small2):
    model = make_model("LATTICE", small2)
    batch = one_batch(small2)
    model.train()
    model.before_epoch(0)
    model.loss(batch).total.backward()
    assert model.modal_weight.grad is not None and model.projection[0].weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.loss(batch).total.backward()  # second batch of the epoch: detached graph
    assert model.modal_weight.grad is None and model.projection[0].weight.grad is None
    assert model.item_embedding.grad is not None


def test_lattice_fixed_graph_isolates_missing_and_infer_mode(small2):
    model = make_model("LATTICE", small2)
    missing = ~small2.observed[:, 0]
    g = model.fixed_eval[0].scipy.toarray()
    for i in np.flatnonzero(missing):
        assert np.count_nonzero(g[i]) == 1 and g[i, i] == pytest.approx(1.0)
        assert np.count_nonzero(g[:, i]) == 1
    normalised = make_model("LATTICE", small2, lattice_infer_normalize_learned=True)
    for m in (model, normalised):
        m.eval()
        m.prepare_eval()
    assert not torch.allclose(model.score_users(torch.arange(5)), normalised.score_users(torch.arange(5)))


def test_lattice_new_items_start_at_zero(small3_new):
    model = make_model("LATTICE", small3_new)
    new = torch.as_tensor(small3_new.new_items)
    assert torch.all(model.item_embedding[new] == 0) and torch.any(model.item_embedding[~new] != 0)


def test_mgcn_isolates_missing_before_topk(small2):
    model = make_model("MGCN", small2)
    k = int(model.knn_k)
    for j in range(2):
        g = model.graphs_eval[j].scipy.toarray()
        missing = ~small2.observed[:, j]
        for i in range(small2.n_items):
            if missing[i]:
                assert np.flatnonzero(g[i]).tolist() == [i]
            else:
                nbrs = np.flatnonzero(g[i])
                assert len(nbrs) == k and not missing[nbrs].any()


@pytest.mark.parametrize("detach", [True, False])
def test_mgcn_new_item_view_gradient_option(small3_new, detach):
    model = make_model("MGCN", small3_new, mgcn_detach_masked_views=detach)
    model.train()
    model.loss(one_batch(small3_new)).total.backward()
    purifier_grad = model.purifier_gate[0].weight.grad
    assert (purifier_grad is None) == detach
    assert model.query[0].weight.grad is not None
