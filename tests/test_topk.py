"""The TopK activation against a naive re-implementation of eq. 1-3, and the annealing schedules."""

import pytest
import torch

from topk_ds.model.topk import SCHEDULES, alpha, topk_activation, topk_indices


def naive(x, k, a, act):
    """Eq. 3 written out per vector: sort with ties to the lower index, keep k, f, blend."""
    f = torch.relu if act == "relu" else (lambda t: t)
    out = torch.empty_like(x)
    flat, res = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for r, row in enumerate(flat):
        order = sorted(range(len(row)), key=lambda i: (-row[i].item(), i))
        mask = torch.zeros_like(row)
        mask[order[:k]] = 1
        res[r] = f(row) * (a + (1 - a) * mask)
    return out


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("act", ["relu", "identity"])
def test_matches_naive(a, act):
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(topk_activation(x, 6, a, act), naive(x, 6, a, act), rtol=0, atol=0)


@pytest.mark.parametrize("act", ["relu", "identity"])
def test_exactly_k_selected(act):
    x = torch.randn(64, 128)
    y = topk_activation(x, 16, 0.0, act)
    nonzero = (y != 0).sum(-1)
    if act == "identity":
        assert (nonzero == 16).all()
    else:
        assert (nonzero <= 16).all()
        # relu zeroes exactly the selected entries that are negative
        picked = x.gather(-1, topk_indices(x, 16))
        assert torch.equal(nonzero, (picked > 0).sum(-1))


def test_relu_can_leave_fewer_than_k():
    x = -torch.rand(4, 10) - 0.1  # all negative: relu kills every selected entry
    assert (topk_activation(x, 3, 0.0, "relu") == 0).all()


def test_ties_broken_by_lower_index():
    x = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0]])
    y = topk_activation(x, 2, 0.0, "identity")
    assert y.tolist() == [[0.0, 2.0, 2.0, 0.0, 0.0, 0.0]]
    # many ties in many rows, as bf16 produces: still exactly k, lowest indices among the tied
    x = torch.randint(0, 4, (200, 48)).float()
    idx = topk_indices(x, 10)
    torch.testing.assert_close(topk_activation(x, 10, 0.0, "identity"), naive(x, 10, 0.0, "identity"), rtol=0, atol=0)
    assert (torch.zeros_like(x).scatter(-1, idx, 1.0).sum(-1) == 10).all()


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("act", ["relu", "identity"])
def test_gradcheck(a, act):
    x = torch.randn(4, 12, dtype=torch.float64)
    x = x + torch.sign(x) * 0.05  # keep away from relu's kink
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: topk_activation(t, 5, a, act), (x,))


@pytest.mark.parametrize("a", [0.0, 0.3])
def test_mask_is_constant_in_backward(a):
    """d y_i / d x_i = f'(x_i) * (alpha + (1 - alpha) * mask_i), no gradient through the selection."""
    x = torch.randn(8, 32, requires_grad=True)
    topk_activation(x, 4, a, "relu").sum().backward()
    mask = torch.zeros_like(x).scatter(-1, topk_indices(x.detach(), 4), 1.0)
    expected = (x.detach() > 0).float() * (a + (1 - a) * mask)
    torch.testing.assert_close(x.grad, expected)


def test_bf16():
    x = torch.randn(16, 256)
    xb = x.bfloat16()
    y = topk_activation(xb, 32, 0.0, "relu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), naive(xb.float(), 32, 0.0, "relu"), rtol=0, atol=0)
    xb.requires_grad_(True)
    topk_activation(xb, 32, 0.2, "relu").float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


def test_saves_indices_not_a_dense_mask():
    x = torch.randn(32, 512, requires_grad=True)
    y = topk_activation(x, 8, 0.0, "relu")
    saved = y.grad_fn.saved_tensors
    assert [t.shape for t in saved if t is not None] == [(32, 8), (32, 8)]
    assert saved[0].dtype == torch.int16


def test_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError):
        topk_activation(x, 9)
    with pytest.raises(ValueError):
        topk_activation(x, 2, alpha=1.5)
    with pytest.raises(ValueError):
        topk_activation(x, 2, act="gelu")


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_endpoints_and_monotone(kind):
    total, ratio = 1000, 0.2
    values = [alpha(s, total, ratio, kind) for s in range(total + 1)]
    assert values[0] == 1.0
    assert all(v == 0.0 for v in values[200:])
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert values[150] < 1.0


def test_linear_schedule_is_the_papers():
    assert alpha(50, 1000, 0.2, "linear") == pytest.approx(0.75)
    assert alpha(100, 1000, 0.2) == pytest.approx(0.5)
    assert alpha(0, 1000, 0.0) == 0.0  # no annealing: pure TopK from the first step
    with pytest.raises(ValueError):
        alpha(1, 10, 0.2, "sigmoid")
