"""LGMRec, DA-MRS and GUME: model contract on 2 and 3 modalities, and their special graphs and losses."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from dgmrec.graphs import normalized_adjacency
from dgmrec.losses import gumbel_softmax, moment_alignment, sym_bernoulli_kl, triple_info_nce, weighted_bpr_loss
from dgmrec.models.damrs import cooccurrence_edges, denoised_knn_edges
from dgmrec.models.gume import enhanced_adjacency, shared_neighbour_edges
from model_checks import (
    check_beats_popularity,
    check_contract,
    check_deterministic,
    check_gradients,
    check_shapes,
    make_model,
)

MODELS = ["LGMRec", "DAMRS", "GUME"]


# ------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("data", ["small2", "small3"])
def test_contract(name, data, request):
    ds = request.getfixturevalue(data)
    check_contract(name, ds, n_epochs=5)


@pytest.mark.parametrize("name", MODELS)
def test_beats_popularity(name, small3, tmp_path):
    check_beats_popularity(name, small3, tmp_path, epochs=12, learning_rate=0.005)


@pytest.mark.parametrize("name", MODELS)
def test_deterministic(name, small2, tmp_path):
    check_deterministic(name, small2, tmp_path, epochs=2)


@pytest.mark.parametrize(("name", "options"), [
    ("LGMRec", {"lgmrec_eval_gumbel": "sample", "lgmrec_item_cl_rows": "positives", "lgmrec_hcl_detach_cf": True}),
    ("DAMRS", {"damrs_isolate_missing": "always", "damrs_nd_rows": "all", "damrs_pseudo_k": 3,
               "damrs_nd_scale": 2.0}),
    ("GUME", {"gume_item_item_edges": True, "gume_vt_rows": "items_complete", "gume_item_cl_rows": "positives",
              "gume_knn_isolation": "before_topk"}),
])
def test_options_run(name, options, small3):
    model = make_model(name, small3, **options)
    check_shapes(model, small3)
    check_gradients(make_model(name, small3, **options), small3)


def test_auto_options_follow_the_release_paths(small2, small3):
    two, three = make_model("DAMRS", small2), make_model("DAMRS", small3)
    assert (two.pseudo_k, two.nd_rows, two.nd_scale) == (10, "all", 1.0)
    assert (three.pseudo_k, three.nd_rows, three.nd_scale) == (three.knn_k, "complete", 0.5)
    # two modalities: no isolation, so the (identical, mean-imputed) missing items link to each other
    missing = np.flatnonzero(~small2.observed[:, 0])
    assert np.count_nonzero(two.infer_views[0].scipy[missing][:, missing].toarray()) > len(missing)
    iso = three.infer_views[0].scipy[np.flatnonzero(~small3.observed[:, 0])].toarray()
    assert (np.count_nonzero(iso, axis=1) == 1).all()
    assert make_model("LGMRec", small2).item_cl_rows == "complete"
    assert make_model("LGMRec", small3).item_cl_rows == "positives"


def test_lgmrec_scoring_is_deterministic_by_default(small2):
    model = make_model("LGMRec", small2)
    model.eval()
    users = torch.arange(5)
    model.prepare_eval()
    first = model.score_users(users)
    model.prepare_eval()
    assert torch.equal(first, model.score_users(users))
    noisy = make_model("LGMRec", small2, lgmrec_eval_gumbel="sample")
    noisy.eval()
    noisy.prepare_eval()
    a = noisy.score_users(users)
    noisy.prepare_eval()
    assert not torch.equal(a, noisy.score_users(users))  # a fresh Gumbel draw per evaluation pass


def test_damrs_new_items_cut_from_training_graphs(small3_new):
    ds = small3_new
    model = make_model("DAMRS", ds)
    new = np.flatnonzero(ds.new_items)
    for graph in model.train_views[:-1]:  # modality graphs: new items keep only their self-loop
        g = graph.scipy.toarray()
        for i in new:
            assert np.count_nonzero(g[i]) == 1 and g[i, i] > 0 and np.count_nonzero(g[:, i]) == 1
    assert any(np.count_nonzero(g.scipy.toarray()[new]) > len(new) for g in model.infer_views[:-1])
    assert len(model.candidates) == ds.n_items - len(new)


def test_gume_default_graph_is_plain_user_item_graph(small2):
    model = make_model("GUME", small2)
    want = normalized_adjacency(small2.train_matrix(), eps=None)
    assert model.n_item_item_edges == 0
    assert abs(model.ui_adj.scipy - want).max() < 1e-6


# ------------------------------------------------------------------------------------ losses and ops


def test_triple_info_nce_matches_formula_and_gradients():
    torch.manual_seed(0)
    a, b = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    neg = torch.randn(11, 4, dtype=torch.float64)
    an, bn, nn_ = F.normalize(a), F.normalize(b), F.normalize(neg)
    tau = 0.2
    want = -torch.log(torch.exp((an * bn).sum(1) / tau) / torch.exp(an @ nn_.T / tau).sum(1)).sum()
    assert float(triple_info_nce(a, b, neg, tau)) == pytest.approx(float(want), rel=1e-10)
    args = tuple(t.clone().requires_grad_() for t in (a, b, neg))
    assert torch.autograd.gradcheck(lambda x, y, z: triple_info_nce(x, y, z, tau), args)


def test_sym_bernoulli_kl_equals_two_kl_terms():
    p = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.4, 0.7], dtype=torch.float64)

    def kl(x, y):
        return x * torch.log(x / y) + (1 - x) * torch.log((1 - x) / (1 - y))

    got = sym_bernoulli_kl(torch.logit(p), torch.logit(q))
    torch.testing.assert_close(got, kl(p, q) + kl(q, p))
    assert torch.isfinite(sym_bernoulli_kl(torch.tensor([60.0]), torch.tensor([-60.0]))).all()


def test_weighted_bpr_hand_computed():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    wp, wn = torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.25])
    s = torch.sigmoid
    want = -((0.5 * torch.log(s(torch.tensor(1.0)))) + (torch.log(s(torch.tensor(-1.0)))
                                                       + 0.25 * torch.log(s(torch.tensor(1.0))))) / 2
    assert float(weighted_bpr_loss(pos, neg, wp, wn)) == pytest.approx(float(want), rel=1e-6)


def test_moment_alignment_hand_computed():
    a = torch.tensor([[1.0, 3.0]])  # mean 2, unbiased var 2
    b = torch.tensor([[0.0, 0.0], [0.0, 4.0]])  # mean 1, unbiased var (1 + 1 + 1 + 9) / 3 = 4
    assert float(moment_alignment(a, b)) == pytest.approx(abs(2.0 - 4.0) + abs(2.0 - 1.0))


def test_gumbel_softmax():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    torch.testing.assert_close(gumbel_softmax(logits, 0.2, noise=False), torch.softmax(logits / 0.2, dim=1))
    g1 = gumbel_softmax(logits, 0.2, generator=torch.Generator().manual_seed(3))
    g2 = gumbel_softmax(logits, 0.2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g1, g2)
    torch.testing.assert_close(g1.sum(1), torch.ones(2))


def test_damrs_pair_weights_hand_computed(small2):
    model = make_model("DAMRS", small2)
    user = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # two views, two items: positive 0, negative 1 for both rows
    views = [torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 5.0], [1.0, 1.0]])]
    pos, neg = torch.tensor([0, 0]), torch.tensor([1, 1])
    w_pos, w_neg = model._pair_weights(user, views, pos, neg)
    s = torch.sigmoid
    r_pos = torch.stack([s(torch.tensor([1.0, 0.0])), s(torch.tensor([0.0, 2.0]))])  # views x rows
    r_neg = torch.stack([s(torch.tensor([0.0, 2.0])), s(torch.tensor([2 ** -0.5, 2 * 2 ** -0.5]))])
    n_bar = r_neg.mean()
    mean = r_pos.mean(0)
    torch.testing.assert_close(w_pos, (mean * torch.exp(-r_pos.var(0)) ** 2).clamp(0, 1))
    torch.testing.assert_close(w_neg, ((r_pos.max(0).values - n_bar).clamp(0, 1) * (mean < n_bar)).float())


# --------------------------------------------------------------------------------------------- graphs


def test_denoised_knn_matches_dense():
    rng = np.random.default_rng(0)
    xs = [rng.random((25, 5)), rng.random((25, 3))]
    iso = rng.random(25) < 0.2
    got = denoised_knn_edges(xs, 4, isolate=[iso, None], chunk_size=6)
    sims = []
    for x in xs:
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        sims.append(xn @ xn.T)
    below = np.zeros((25, 25), dtype=bool)
    for s in sims:
        below |= s < s.mean()
    for (rows, cols), s, isolate in zip(got, sims, [iso, None], strict=True):
        s = np.where(below, 0.0, s)
        if isolate is not None:
            s[:, isolate] = 0
            s[isolate] = 0
            s[isolate, isolate] = 1
        want = set()
        for i in range(25):
            order = np.argsort(-s[i], kind="stable")[: min(4, int((s[i] > 0).sum()))]
            want |= {(i, int(j)) for j in order}
        assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == want


def test_cooccurrence_edges_hand_computed():
    # users x items; items 0 and 1 share users 0, 1, 2; items 0 and 2 share users 0, 1; 1 and 2 share 0, 1
    r = sp.csr_matrix(np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32))
    rows, cols, counts = cooccurrence_edges(r, k=1, min_shared=2)
    assert list(zip(rows.tolist(), cols.tolist(), counts.tolist(), strict=True)) == [
        (0, 1, 3.0), (1, 0, 3.0), (2, 0, 2.0)]  # item 3 shares only one user with anyone
    rows, _, _ = cooccurrence_edges(r, k=5, min_shared=2)
    assert np.bincount(rows, minlength=4).tolist() == [2, 2, 2, 0]


def test_gume_shared_neighbours_and_enhanced_adjacency():
    g1 = sp.csr_matrix(np.array([[1, 1, 1], [1, 1, 0], [0, 1, 1]], dtype=np.float32))
    g2 = sp.csr_matrix(np.array([[1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=np.float32))
    shared = shared_neighbour_edges([g1, g2]).toarray()
    np.testing.assert_array_equal(shared, [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    train = sp.csr_matrix(np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32))
    adj = enhanced_adjacency(train, sp.csr_matrix(shared)).toarray()
    a = np.zeros((5, 5))
    a[:2, 2:] = train.toarray()
    a[2:, :2] = train.toarray().T
    a[2:, 2:] = shared
    d = a.sum(1) ** -0.5
    np.testing.assert_allclose(adj, d[:, None] * a * d[None, :], rtol=1e-6)
