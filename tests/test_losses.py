"""Shared losses against direct formulas (values and gradients); the fused kernels are in test_fused.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.losses import info_nce, linear_mse, perturb
from dgmrec.ops import fused


def reference_nce(a, b, tau, ids=None):
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau
    vals = []
    for i in range(len(a)):
        keep = [j for j in range(len(a))
                if j == i or ids is None or (ids[0][j] != ids[0][i] and ids[1][j] != ids[1][i])]
        vals.append(torch.logsumexp(logits[i, keep], 0) - logits[i, i])
    return torch.stack(vals).mean()


def test_info_nce_matches_formula_and_gradients(monkeypatch):
    monkeypatch.setattr(fused._CosineNCE, "block", 3)  # several blocks
    torch.manual_seed(0)
    a = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    ids = (torch.tensor([0, 1, 0, 2, 3, 4, 1, 5]), torch.tensor([5, 6, 7, 5, 8, 9, 10, 11]))
    for use_ids in (None, ids):
        got = info_nce(a, b, 0.3, use_ids)
        want = reference_nce(a, b, 0.3, use_ids)
        assert torch.allclose(got, want)
        ga = torch.autograd.grad(got, (a, b))
        gb = torch.autograd.grad(want, (a, b))
        assert all(torch.allclose(x, y) for x, y in zip(ga, gb, strict=True))
    assert torch.autograd.gradcheck(lambda x, y: info_nce(x, y, 0.5, ids), (a, b))


def test_linear_mse_is_the_decoder_mse(monkeypatch):
    monkeypatch.setattr(fused._LinearMSE, "block", 4)
    torch.manual_seed(1)
    layer = nn.Linear(3, 7).double()
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    got = linear_mse(x, layer, y)
    want = F.mse_loss(layer(x), y)
    assert torch.allclose(got, want)
    params = (x, y, layer.weight, layer.bias)
    for g1, g2 in zip(torch.autograd.grad(2 * got, params), torch.autograd.grad(2 * want, params), strict=True):
        assert torch.allclose(g1, g2)


def test_perturb_pushes_away_from_zero_by_at_most_scale():
    x = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    y = perturb(x, 0.1)
    assert y[0, 2] == 0.0
    delta = (y - x) * torch.sign(x)
    assert (delta[0, [0, 1, 3]] > 0).all()
    assert float((y - x).norm()) <= 0.1 + 1e-6


def test_dropout_zeroes_with_probability_p_and_keeps_the_expectation():
    from dgmrec.losses import Dropout, dropout

    torch.manual_seed(0)
    x = torch.full((400, 250), 2.0, requires_grad=True)
    y = dropout(x, 0.3)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.7) < 0.01  # 100,000 draws: sd 0.0015
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / 0.7))
    y.sum().backward()  # the gradient flows through the kept entries only, scaled alike
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    assert not dropout(x, 1.0).any()
    layer = Dropout(0.5)
    assert not torch.equal(layer(x), x)
    layer.eval()
    assert layer(x) is x
