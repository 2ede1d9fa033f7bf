"""Shared losses against direct formulas (values and gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.losses import TableGradient, _CosineNCE, _LinearMSE, info_nce, linear_mse, perturb, table_linear


def reference_nce(a, b, tau, ids=None):
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau
    vals = []
    for i in range(len(a)):
        keep = [j for j in range(len(a))
                if j == i or ids is None or (ids[0][j] != ids[0][i] and ids[1][j] != ids[1][i])]
        vals.append(torch.logsumexp(logits[i, keep], 0) - logits[i, i])
    return torch.stack(vals).mean()


def test_info_nce_matches_formula_and_gradients(monkeypatch):
    monkeypatch.setattr(_CosineNCE, "block", 3)  # several blocks
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


def test_linear_mse_matches_autograd(monkeypatch):
    monkeypatch.setattr(_LinearMSE, "block", 4)
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


def test_fused_table_gradient_equals_the_sum_of_both_parts():
    """Encoder and reconstruction gradients of one trainable table, fused in place, in either backward order."""
    torch.manual_seed(2)
    table = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64)
    dec = nn.Linear(5, 6).double()
    z = torch.randn(9, 5, dtype=torch.float64)

    def encoder_term(hand_off):
        return torch.sigmoid(table_linear(table, w, b, hand_off)).square().sum()

    plain = torch.autograd.grad(encoder_term(None) + 0.3 * F.mse_loss(dec(z), table), (table, w))
    for recon_first in (False, True):
        hand_off = TableGradient()
        if recon_first:  # recon node created first: autograd reaches the encoder node before it
            total = 0.3 * linear_mse(z, dec, table, hand_off) + encoder_term(hand_off)
        else:
            total = encoder_term(hand_off) + 0.3 * linear_mse(z, dec, table, hand_off)
        fused = torch.autograd.grad(total, (table, w))
        assert all(torch.allclose(x, y) for x, y in zip(fused, plain, strict=True))
        assert hand_off.pending is None
    # with a persistent buffer the finished gradient is installed as table.grad, step after step
    buffer = torch.empty_like(table)
    for recon_first in (False, True, False):
        table.grad = None
        hand_off = TableGradient(table, buffer)
        if recon_first:
            total = 0.3 * linear_mse(z, dec, table, hand_off) + encoder_term(hand_off)
        else:
            total = encoder_term(hand_off) + 0.3 * linear_mse(z, dec, table, hand_off)
        total.backward()
        assert torch.allclose(table.grad, plain[0])
        assert (table.grad.data_ptr() == buffer.data_ptr()) == (not recon_first)


def test_perturb_pushes_away_from_zero_by_at_most_scale():
    x = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    y = perturb(x, 0.1)
    assert y[0, 2] == 0.0
    delta = (y - x) * torch.sign(x)
    assert (delta[0, [0, 1, 3]] > 0).all()
    assert float((y - x).norm()) <= 0.1 + 1e-6
