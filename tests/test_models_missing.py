"""Missing-modality-aware baselines (CI2MG, MILK, SIBRAR): model contract on 2 and 3 modalities, the
departure options, and hand-checked pieces (Sinkhorn transport, prototype hypergraph, environments, sampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgmrec.graphs import bipartite_adjacency
from dgmrec.models.base import Batch
from dgmrec.models.ci2mg import prototype_hypergraph_conv, sinkhorn_transport
from dgmrec.models.milk import environment_weights
from dgmrec.models.sibrar import draw_modality_pairs
from model_checks import (
    check_beats_popularity,
    check_contract,
    check_deterministic,
    make_model,
)

MODELS = ["CI2MG", "MILK", "SIBRAR"]

# every departure option away from its default (the defaults are covered by the contract tests)
OPTIONS = [
    ("CI2MG", {"ci2mg_contrast": "infonce", "ci2mg_learn_delta": True}),
    ("MILK", {"milk_mix_mode": "available_only", "milk_align_rows": "complete", "milk_normalize": "never",
              "milk_user_init": "normal"}),
    ("MILK", {"milk_normalize": "always"}),
    ("SIBRAR", {"sibrar_sample_available": True, "sibrar_infer_available": True}),
]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("data", ["small2", "small3"])
def test_contract(name, data, request):
    ds = request.getfixturevalue(data)
    check_contract(name, ds, n_epochs=5)


@pytest.mark.parametrize(("name", "options"), OPTIONS)
def test_options(name, options, small3):
    check_contract(name, small3, n_epochs=4, **options)


@pytest.mark.parametrize("name", MODELS)
def test_beats_popularity(name, small3, tmp_path):
    check_beats_popularity(name, small3, tmp_path, epochs=20, learning_rate=0.005)


@pytest.mark.parametrize("name", MODELS)
def test_deterministic(name, small2, tmp_path):
    check_deterministic(name, small2, tmp_path, epochs=2)


# ------------------------------------------------------------------------------------ Sinkhorn transport


def _dense_sinkhorn(cost: torch.Tensor, epsilon: float, n_iter: int) -> torch.Tensor:
    """The reference algorithm, literally: normalise the whole kernel, then rows/columns in turn."""
    q = torch.exp(-cost / epsilon)
    n, m = q.shape
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(1, keepdim=True) / n
        q = q / q.sum(0, keepdim=True) / m
    return q * n


def test_sinkhorn_transport_matches_dense_plan_and_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(23, 4, generator=gen, dtype=torch.float64)
    y = torch.rand(17, 4, generator=gen, dtype=torch.float64)
    values = torch.randn(17, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    values_t = torch.randn(23, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    cost = torch.cdist(x, y) ** 2
    plan, plan_t = _dense_sinkhorn(cost, 0.7, 6), _dense_sinkhorn(cost.T, 0.7, 6)
    out, out_t = sinkhorn_transport(x, y, values, 0.7, 6, values_t=values_t, chunk_size=5)
    assert out_t is not None
    torch.testing.assert_close(out, plan @ values)
    torch.testing.assert_close(out_t, plan_t @ values_t)
    w, w_t = torch.randn_like(out), torch.randn_like(out_t)
    ((out * w).sum() + (out_t * w_t).sum()).backward()
    torch.testing.assert_close(values.grad, plan.T @ w)
    torch.testing.assert_close(values_t.grad, plan_t.T @ w_t)
    alone, none = sinkhorn_transport(x, y, values, 0.7, 6, chunk_size=100)
    assert none is None
    torch.testing.assert_close(alone, plan @ values)


def test_prototype_hypergraph_conv_hand_computed():
    h = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])  # third item: zero row (degree patched to 1)
    phi = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[1.0], [2.0], [3.0]])
    # D = (1, 1, 1 patched), B = (1.5, 0.5); R = D^-1 H Phi B^-1 H^T
    r = torch.diag(1 / torch.tensor([1.0, 1.0, 1.0])) @ h @ phi @ torch.diag(1 / torch.tensor([1.5, 0.5])) @ h.T
    torch.testing.assert_close(prototype_hypergraph_conv(y, h, phi), r @ y)
    # by hand: H^T y = (2, 1) -> / B = (4/3, 2) -> Phi @ = (8/3, 10/3) -> H @ = (8/3, 3, 0)
    torch.testing.assert_close(prototype_hypergraph_conv(y, h, phi), torch.tensor([[8 / 3], [3.0], [0.0]]))


def test_ci2mg_forward_matches_dense_formulation(small2):
    model = make_model("CI2MG", small2)
    model.eval()
    with torch.no_grad():
        f = model.forward_all()
        U, n_items = model.n_users, model.n_items
        a = torch.as_tensor(bipartite_adjacency(small2.train_matrix()).toarray())
        rw = a / (a.sum(1, keepdim=True) + 1e-7)
        layers = [torch.cat([model.user_embedding, model.item_embedding])]
        for _ in range(3):
            layers.append(rw @ layers[-1])
        cf = torch.stack(layers).mean(0)
        hyper, users = [], []
        for j in range(2):
            proj = model.encoders[j](model.features(j))
            user = rw[:U, U:] @ proj
            item = rw[U:, :U] @ user
            h = F.normalize(item, dim=1) @ F.normalize(model.prototypes[j], dim=1).T
            deg_r, deg_c = h.sum(1), h.sum(0)
            deg_r[deg_r == 0], deg_c[deg_c == 0] = 1.0, 1.0
            r = torch.diag(1 / deg_r) @ h @ model.hyper_mixing[j].weight @ torch.diag(1 / deg_c) @ h.T
            y = item
            for _ in range(2):
                y = torch.sigmoid(r @ y)
            hyper.append(y)
            users.append(F.normalize(user, dim=1))
        dist = torch.cdist(hyper[0], hyper[1]) ** 2
        generated = [_dense_sinkhorn(dist.T, 5.0, 10) @ hyper[0], _dense_sinkhorn(dist, 5.0, 10) @ hyper[1]]
        enhanced = [F.normalize(model.bn(model.enhancers[j](torch.cat([hyper[j], generated[j]], 1))), dim=1)
                    for j in range(2)]
        torch.testing.assert_close(f["user"], torch.cat([cf[:U], *users], 1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(f["item"], torch.cat([cf[U:], *enhanced], 1), atol=1e-5, rtol=1e-4)
        assert f["item"].shape == (n_items, 3 * 64)


def test_ci2mg_release_contrast_is_constant(small3):
    model = make_model("CI2MG", small3, lamb_1=2.0)
    batch = Batch(torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8]))
    observed = model.observed[torch.tensor([3, 4, 5])]
    expected = 2.0 * math.log(2.0) * int(observed.any(0).sum())
    assert model.loss(batch).parts["contrast"] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------ MILK


def test_milk_environments_are_uniform_plus_cyclic_shifts():
    env = environment_weights(torch.tensor([0.7, 0.3]))
    torch.testing.assert_close(env, torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.3, 0.7]]))
    env = environment_weights(torch.tensor([0.5, 0.3, 0.2]))  # the release's (l1,l2,l3), (l3,l1,l2), (l2,l3,l1)
    third = 1 / 3
    expected = torch.tensor([[third, third, third], [0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5]])
    torch.testing.assert_close(env, expected)


def test_milk_availability_scale_and_alignment_rows(small3):
    model = make_model("MILK", small3)
    obs = torch.as_tensor(small3.observed)
    n_obs = obs.sum(1).float()
    torch.testing.assert_close(model.kappa, torch.where(n_obs > 0, 1 / n_obs.clamp_min(1), torch.zeros(())))
    assert model.pairs == [(0, 1), (0, 2), (1, 2)]
    # pair (0, 1): dropped are items whose missing set is exactly {0} or exactly {1}
    missing = ~obs
    only = missing & (missing.sum(1, keepdim=True) == 1)
    torch.testing.assert_close(model.align_excluded[:, 0], only[:, 0] | only[:, 1])
    complete = make_model("MILK", small3, milk_align_rows="complete")
    torch.testing.assert_close(complete.align_excluded[:, 0], missing[:, 0] | missing[:, 1])
    # scoring: kappa * sum of projections; all-missing items score zero
    model.eval()
    model.prepare_eval()
    assert model._cache is not None
    with torch.no_grad():
        proj = model.project()
    torch.testing.assert_close(model._cache, proj.sum(0) * model.kappa[:, None])


def test_milk_available_only_mixture_hand_computed(small2):
    model = make_model("MILK", small2, milk_mix_mode="available_only")
    items = torch.tensor([0, 1, 2])
    model.observed[items] = torch.tensor([[True, True], [True, False], [False, False]])
    projected = torch.tensor([[[1.0], [2.0], [3.0]], [[10.0], [20.0], [30.0]]])  # (M=2, n=3, d=1)
    out = model.mix(projected, torch.tensor([[0.25, 0.75]]), items)[0, :, 0]
    torch.testing.assert_close(out, torch.tensor([0.25 * 1 + 0.75 * 10, 2.0, 0.0]))


# ---------------------------------------------------------------------------------------------- SIBRAR


def test_sibrar_pairs_are_distinct_uniform_and_respect_availability():
    gen = torch.Generator().manual_seed(0)
    pairs = draw_modality_pairs(torch.ones(6000, 3, dtype=torch.bool), gen)
    assert bool((pairs[:, 0] != pairs[:, 1]).all())
    counts = np.bincount((pairs[:, 0] * 3 + pairs[:, 1]).numpy(), minlength=9)
    assert counts[[0, 4, 8]].sum() == 0 and counts.min(where=counts > 0, initial=6000) > 800  # ~1000 each
    available = torch.tensor([[True, False, True], [True, False, False]])
    pairs = draw_modality_pairs(available.repeat(50, 1), gen)
    assert set(pairs[0::2].flatten().tolist()) == {0, 2} and bool((pairs[0::2, 0] != pairs[0::2, 1]).all())
    assert bool((pairs[1::2] == 0).all())  # only the ID: repeated


def test_sibrar_loss_and_scores_follow_the_formulas(small2):
    model = make_model("SIBRAR", small2, temp=0.01, lamb=1.0)
    batch = Batch(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
    torch.manual_seed(5)
    out = model.loss(batch)
    assert math.isfinite(float(out.total.detach()))  # small temperature: no inf - inf
    torch.manual_seed(5)
    pair = draw_modality_pairs(torch.ones(2, 3, dtype=torch.bool))
    with torch.no_grad():
        emb = model.embed()
        a, b = pair[:, 0], pair[:, 1]
        pa, pb = emb[a, batch.pos], emb[b, batch.pos]
        na, nb = emb[a, batch.neg], emb[b, batch.neg]
        u = model.user_embedding[batch.users]
        bpr = -F.logsigmoid((u * (pa + pb)).sum(1) - (u * (na + nb)).sum(1)).mean()
        pi, nu1, nu2 = ((pa * pb).sum(1), (pa * nb).sum(1), (pb * na).sum(1))
        info = (torch.logaddexp(pi / 0.01, nu1 / 0.01) + torch.logaddexp(pi / 0.01, nu2 / 0.01) - 2 * pi / 0.01).mean()
    assert out.parts["bpr"] == pytest.approx(float(bpr), rel=1e-5)
    assert out.parts["info"] == pytest.approx(float(info), rel=1e-4, abs=1e-5)
    model.eval()
    model.prepare_eval()
    torch.testing.assert_close(model.score_users(torch.tensor([0])), model.user_embedding[:1] @ emb.mean(0).T)
