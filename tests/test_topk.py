"""The TopK activation against a naive re-implementation of eq. 1-3 and against the previous
(tie-resolving) implementation, under torch.compile, and the annealing schedules."""

import math

import pytest
import torch

from topk_ds.model import ModelConfig, TopK, TopKConfig
from topk_ds.model.llama import Block, rope_cos_sin
from topk_ds.model.topk import SCHEDULES, alpha, topk_activation, topk_indices


def naive_mask(x, k):
    """Per vector: sort with NaN first, then by value (-0.0 equal to 0.0), ties to the lower index; keep k."""
    mask = torch.zeros(x.shape, dtype=torch.bool)
    flat, res = x.reshape(-1, x.shape[-1]), mask.view(-1, x.shape[-1])
    for r, row in enumerate(flat.tolist()):
        order = sorted(range(len(row)), key=lambda i: (not math.isnan(row[i]), 0.0 if math.isnan(row[i]) else -row[i], i))
        res[r, order[:k]] = True
    return mask


def naive(x, k, a, act):
    """Eq. 3 written out: f(x) * (alpha + (1 - alpha) * mask), i.e. f(x) on the kept entries and
    alpha * f(x) elsewhere, alpha in x's dtype."""
    f = torch.relu(x) if act == "relu" else x
    return torch.where(naive_mask(x, k), f, f * torch.tensor(a, dtype=x.dtype))


def previous_topk_indices(x, k):
    """The implementation this one replaced: top-(k+1) to detect a tie at the k-th value, then the tied
    rows resolved by index through boolean indexing (a host sync and data-dependent shapes)."""
    if k == x.shape[-1]:
        return x.topk(k, dim=-1).indices
    values, idx = x.topk(k + 1, dim=-1, sorted=False)
    low, pos = values.min(dim=-1, keepdim=True)
    values = values.scatter(-1, pos, values[..., k:])[..., :k]
    idx = idx.scatter(-1, pos, idx[..., k:])[..., :k]
    tied = values.min(dim=-1).values == low.squeeze(-1)
    if tied.any():
        rows, kth = x[tied], low[tied]
        above, at = rows > kth, rows == kth
        fill = k - above.sum(dim=-1, keepdim=True)
        idx[tied] = (above | (at & (at.cumsum(dim=-1) <= fill))).nonzero()[:, 1].view(-1, k)
    return idx


def as_mask(x, idx):
    return torch.zeros(x.shape, dtype=torch.bool).scatter(-1, idx, True)


def tied(shape, dtype, levels=5):
    """Values from a few levels (many ties in every row), both signs of zero among them."""
    x = torch.randint(-levels, levels + 1, shape).to(dtype) / 2
    return torch.where(torch.rand(shape) < 0.2, torch.tensor(-0.0, dtype=dtype), x)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape, k", [((7,), 3), ((1,), 1), ((5, 64), 64), ((3, 4, 300), 17), ((2, 2, 3, 48), 1),
                                      ((6, 2048), 64)])
def test_selection_with_ties_matches_naive_and_previous(dtype, shape, k):
    for x in (tied(shape, dtype), torch.randn(shape).to(dtype)):
        idx = topk_indices(x, k)
        assert idx.shape == (*shape[:-1], k)
        assert torch.equal(as_mask(x, idx), naive_mask(x, k))
        assert torch.equal(as_mask(x, idx), as_mask(x, previous_topk_indices(x, k)))
    for a, act in ((0.0, "relu"), (0.3, "identity")):
        torch.testing.assert_close(topk_activation(x, k, a, act), naive(x, k, a, act), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selection_with_nan_inf_and_signed_zeros(dtype):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[0.0, -0.0, 1.0, -0.0, 0.0, -1.0],
                      [-inf, nan, 2.0, inf, -nan, inf],
                      [-inf, -inf, -inf, -5.0, -inf, -inf]], dtype=dtype)
    idx = topk_indices(x, 3)
    assert as_mask(x, idx).tolist() == [[True, True, True, False, False, False],  # -0.0 ties with 0.0
                                        [False, True, False, True, True, False],  # NaN above +inf
                                        [True, True, False, True, False, False]]
    assert torch.equal(as_mask(x, idx), naive_mask(x, 3))


def test_wide_16_bit_rows_use_64_bit_keys():
    x = tied((2, 70_000), torch.bfloat16)  # 16 value bits + 17 index bits exceed int32
    expected = x.float().sort(dim=-1, descending=True, stable=True).indices[:, :100]
    assert torch.equal(as_mask(x, topk_indices(x, 100)), as_mask(x, expected))


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


@pytest.mark.slow
def test_compiles_whole_and_equals_eager():
    """torch.compile(fullgraph=True) is the proof that the op has no data-dependent shapes or host
    syncs. The op through inductor equals eager bit for bit (forward and backward, bf16 with ties, fp32);
    a TopK block's forward + backward compiles as one graph (aot_eager: inductor's own RMSNorm
    reduction order and silu backward differ from eager's by an ulp, which says nothing of TopK) and
    changing alpha does not recompile it: only the end of annealing (alpha > 0 to 0) does."""
    from torch._dynamo.testing import CompileCounterWithBackend

    op = torch.compile(topk_activation, fullgraph=True)
    for dtype, a, act in ((torch.bfloat16, 0.0, "relu"), (torch.float32, 0.5, "relu")):
        x = (tied((4, 16, 64), dtype) if dtype == torch.bfloat16 else torch.randn(4, 16, 64)).requires_grad_()
        xc = x.detach().clone().requires_grad_()
        y, yc = topk_activation(x, 8, a, act), op(xc, 8, a, act)
        grad = torch.randn_like(y)
        y.backward(grad), yc.backward(grad)
        assert torch.equal(y, yc) and torch.equal(x.grad, xc.grad), (dtype, a, act)

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=96, vocab_size=97)
    for dtype in (torch.float32, torch.bfloat16):
        block = Block(0, cfg, TopKConfig(k=8, n_nontopk=1)).to(dtype)
        assert isinstance(block.act, TopK)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(block, fullgraph=True, backend=counter)
        cos, sin = (t.to(dtype) for t in rope_cos_sin(torch.arange(16), cfg.head_dim, cfg.rope_theta))
        x = torch.randn(2, 16, 64).to(dtype)
        for a, graphs in ((0.5, 1), (0.25, 1), (0.0, 2)):
            block.act.alpha = a
            results = []
            for run in (block, compiled):
                h = x.clone().requires_grad_()
                block.zero_grad()
                out = run(h, cos, sin)
                out.backward(torch.ones_like(out))
                results.append([out, h.grad, *(p.grad for p in block.parameters())])
            assert all(torch.equal(e, c) for e, c in zip(*results)), (dtype, a)
            assert counter.frame_count == graphs
