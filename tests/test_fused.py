"""Every fused kernel against its plain autograd reference (values and gradients), over several blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dgmrec.ops import fused
from dgmrec.training.sampler import NegativeSampler
from model_checks import make_model


def _grads(value: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(value, inputs)


def _assert_same(got: torch.Tensor, want: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    torch.testing.assert_close(got, want)
    # a non-unit upstream gradient: the kernels scale their precomputed gradients by it
    for g1, g2 in zip(_grads(1.7 * got, inputs), _grads(1.7 * want, inputs), strict=True):
        torch.testing.assert_close(g1, g2)


def test_cosine_nce_reference_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    e = torch.exp(torch.tensor(2.0, dtype=torch.float64))  # exp(cos / tau) with cos 1, tau 0.5
    one = torch.tensor(1.0, dtype=torch.float64)
    # cosines of each row with b's rows: row 0 [1, 0, 0], row 1 [0, 1, 1], row 2 [1, 0, 0]; positives 1, 1, 0
    want = (torch.log(e + 2) - 2 + torch.log(1 + 2 * e) - 2 + torch.log(e + 2)) / 3
    torch.testing.assert_close(fused.cosine_nce_reference(a, b, 2.0), want)
    # ids: rows 0 and 2 share a's id 7, so each leaves the other out of its denominator
    ids = (torch.tensor([7, 8, 7]), torch.tensor([1, 2, 3]))
    masked = (torch.log(e + 1) - 2 + torch.log(1 + 2 * e) - 2 + torch.log(one + 1)) / 3
    torch.testing.assert_close(fused.cosine_nce_reference(a, b, 2.0, *ids), masked)


@pytest.mark.parametrize("with_ids", [False, True])
def test_cosine_nce_matches_reference(monkeypatch, with_ids):
    monkeypatch.setattr(fused._CosineNCE, "block", 3)  # several blocks, the last one short
    torch.manual_seed(0)
    a = F.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1).requires_grad_()
    b = F.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1).requires_grad_()
    ids = (torch.tensor([0, 1, 0, 2, 3, 4, 1, 5]), torch.tensor([5, 6, 7, 5, 8, 9, 10, 11])) if with_ids else (None,
                                                                                                               None)
    _assert_same(fused.cosine_nce(a, b, 2.5, *ids), fused.cosine_nce_reference(a, b, 2.5, *ids), (a, b))


def test_triple_nce_matches_reference(monkeypatch):
    monkeypatch.setattr(fused._TripleNCE, "block", 4)
    torch.manual_seed(1)
    a, b = (F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=1).requires_grad_() for _ in range(2))
    neg = F.normalize(torch.randn(13, 4, dtype=torch.float64), dim=1).requires_grad_()
    _assert_same(fused.triple_nce(a, b, neg, 5.0), fused.triple_nce_reference(a, b, neg, 5.0), (a, b, neg))
    want = sum(torch.logsumexp(5.0 * neg @ a[i], 0) - 5.0 * a[i] @ b[i] for i in range(9))
    torch.testing.assert_close(fused.triple_nce_reference(a, b, neg, 5.0), want)


def test_linear_mse_matches_reference(monkeypatch):
    monkeypatch.setattr(fused._LinearMSE, "block", 4)
    torch.manual_seed(2)
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    _assert_same(fused.linear_mse(x, w, b, y), fused.linear_mse_reference(x, w, b, y), (x, w, b, y))
    torch.testing.assert_close(fused.linear_mse_reference(x, w, b, y), ((x @ w.T + b - y) ** 2).mean())
    # a target without gradient (the frozen original features) and an input without gradient
    _assert_same(fused.linear_mse(x.detach(), w, b, y.detach()),
                 fused.linear_mse_reference(x.detach(), w, b, y.detach()), (w, b))


def _table_problem():
    torch.manual_seed(3)
    table = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(4, 6, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64)
    dec_w, dec_b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    z = torch.randn(9, 5, dtype=torch.float64)

    def objective(recon_first: bool, linear, mse) -> torch.Tensor:
        """The two uses of the table, in either order of creation (which changes autograd's order)."""
        def enc() -> torch.Tensor:
            return torch.sigmoid(linear(table, w, b)).square().sum()

        def rec() -> torch.Tensor:
            return 0.3 * mse(z, dec_w, dec_b, table)

        return rec() + enc() if recon_first else enc() + rec()

    return table, w, objective


@pytest.mark.parametrize("recon_first", [False, True])
def test_fused_table_gradient_equals_the_reference(recon_first):
    """Encoder and reconstruction gradients of one trainable table, fused in place, in either backward order."""
    table, w, objective = _table_problem()
    plain = _grads(objective(recon_first, fused.table_linear_reference, fused.linear_mse_reference), (table, w))
    with fused_context(table) as hand_offs:
        value = objective(recon_first, fused.table_linear, fused.linear_mse)
    assert fused._ACTIVE == []  # the context is closed; the backward pass runs after it
    got = _grads(value, (table, w))
    for g1, g2 in zip(got, plain, strict=True):
        torch.testing.assert_close(g1, g2)
    assert hand_offs[0].pending is None and hand_offs[0].encoder_done


def fused_context(table: torch.Tensor, buffer: torch.Tensor | None = None):
    return fused.fused_table_gradients([table], None if buffer is None else [buffer])


def test_fused_table_gradient_installs_the_persistent_buffer():
    table, _, objective = _table_problem()
    plain = _grads(objective(False, fused.table_linear_reference, fused.linear_mse_reference), (table,))[0]
    buffer = torch.empty_like(table)
    for recon_first in (False, True, False):
        table.grad = None
        with fused_context(table, buffer):
            value = objective(recon_first, fused.table_linear, fused.linear_mse)
        value.backward()
        torch.testing.assert_close(table.grad, plain)
        # the buffer is the gradient when the reconstruction node runs first (created last)
        assert (table.grad.data_ptr() == buffer.data_ptr()) == (not recon_first)
    # a gradient another backward pass leaves on the table in the meantime is added to, not replaced
    table.grad = None
    with fused_context(table, buffer):
        value = objective(False, fused.table_linear, fused.linear_mse)
    (3.0 * table).sum().backward()
    value.backward()
    torch.testing.assert_close(table.grad, plain + 3.0)


def test_fusion_only_for_the_registered_table():
    table, _, _ = _table_problem()
    other = table.detach().clone().requires_grad_()
    with fused_context(table) as hand_offs:
        assert fused._hand_off(table) is hand_offs[0]
        assert fused._hand_off(other) is None
        assert fused._hand_off(table[1:]) is None  # a slice is another tensor: not the whole table
    assert fused._hand_off(table) is None


def test_dgmrec_training_step_fuses_its_table_gradients(small2):
    """DGMRec's loss() is its objective() with each table's two gradients fused into the persistent buffer."""
    model = make_model("DGMRec", small2)
    assert model.fuse_table_grads
    batch = next(iter(NegativeSampler(small2.train, small2.n_items, seed=0).epoch(256, True)))
    grads = {}
    for step in ("objective", "loss"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same noise in both
        out = getattr(model, step)(batch)
        out.total.backward()
        grads[step] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads["loss"]) == set(grads["objective"])
    for name, g in grads["loss"].items():
        torch.testing.assert_close(g, grads["objective"][name], rtol=1e-5, atol=1e-7)
    buffers = model._table_grad_buffers
    assert all(x.grad.data_ptr() == b.data_ptr() for x, b in zip(model.features, buffers, strict=True))


def _kernel_cases():
    """(name, fused call, reference call, inputs, GEMM dtype under bf16 autocast) over several blocks, float32."""
    torch.manual_seed(4)
    a, b = (F.normalize(torch.randn(40, 16), dim=1).requires_grad_() for _ in range(2))
    neg = F.normalize(torch.randn(30, 16), dim=1).requires_grad_()
    x, y = torch.randn(40, 12, requires_grad=True), torch.randn(40, 24, requires_grad=True)
    w, bias = (0.3 * torch.randn(24, 12)).requires_grad_(), torch.randn(24, requires_grad=True)
    return [
        ("cosine_nce", lambda: fused.cosine_nce(a, b, 5.0), lambda: fused.cosine_nce_reference(a, b, 5.0), (a, b),
         torch.bfloat16),
        ("triple_nce", lambda: fused.triple_nce(a, b, neg, 5.0),
         lambda: fused.triple_nce_reference(a, b, neg, 5.0), (a, b, neg), torch.bfloat16),
        ("linear_mse", lambda: fused.linear_mse(x, w, bias, y),
         lambda: fused.linear_mse_reference(x, w, bias, y), (x, w, bias, y), torch.bfloat16),
    ]


@pytest.mark.parametrize("case", range(3))
def test_kernels_under_bf16_autocast_multiply_in_bfloat16_and_stay_close(monkeypatch, case):
    """Under autocast the GEMM operands are bfloat16 (as autocast's own products); values and gradients stay
    within bfloat16 rounding of the float32 reference and come back in float32."""
    for cls in (fused._CosineNCE, fused._TripleNCE, fused._LinearMSE):
        monkeypatch.setattr(cls, "block", 16)
    monkeypatch.setattr(fused._CosineNCE, "block_low", 16)
    name, kernel, reference, inputs, dtype = _kernel_cases()[case]
    seen: list[torch.dtype | None] = []
    low = fused._low
    monkeypatch.setattr(fused, "_low", lambda t, dtype: (seen.append(dtype), low(t, dtype))[1])
    want = reference()
    want_grads = _grads(want, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kernel()
    got_grads = _grads(got, inputs)
    assert set(seen) == {dtype}, name
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_grads)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    for g1, g2 in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g1, g2, rtol=5e-2, atol=5e-3)
    seen.clear()
    kernel()  # outside autocast: float32 GEMMs
    assert set(seen) <= {None}


def test_table_gradient_fusion_under_bf16_autocast():
    """The fused encoder/reconstruction gradients of a table with bfloat16 GEMMs (a float32 table)."""
    torch.manual_seed(5)
    table = torch.randn(33, 20, requires_grad=True)
    w, b = (0.3 * torch.randn(8, 20)).requires_grad_(), torch.randn(8)
    dec_w, dec_b, z = 0.3 * torch.randn(20, 6), torch.randn(20), torch.randn(33, 6)

    def objective(linear, mse) -> torch.Tensor:
        return torch.sigmoid(linear(table, w, b)).square().sum() + 0.3 * mse(z, dec_w, dec_b, table)

    plain = _grads(objective(fused.table_linear_reference, fused.linear_mse_reference), (table, w))
    with fused_context(table) as hand_offs, torch.autocast("cpu", dtype=torch.bfloat16):
        value = objective(fused.table_linear, fused.linear_mse)
    assert hand_offs[0]._low is not None and hand_offs[0]._low.dtype == torch.bfloat16  # one cast of the table
    got = _grads(value, (table, w))
    for g1, g2 in zip(got, plain, strict=True):
        assert g1.dtype == torch.float32
        torch.testing.assert_close(g1, g2, rtol=5e-2, atol=5e-2)
