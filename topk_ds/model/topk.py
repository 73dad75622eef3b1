"""The (annealed) TopK activation, eq. 1-3 of the paper, and the alpha annealing schedules.

    TopK(x)  = f(x) * 1[x >= tau_k(x)]                     exactly k entries per vector
    y        = f(x) * (alpha + (1 - alpha) * mask)           annealed (alpha=1 dense, 0 pure TopK)

The mask is a constant in backward. Ties at the k-th value are broken by index (lowest wins), so
the selection is a function of x alone, not of the topk kernel.
"""

import math

import torch
from torch import nn

ACTIVATIONS = ("relu", "identity")
SCHEDULES = ("linear", "cosine", "exponential", "step")


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices (..., k) of the k largest entries along the last dim; ties go to the lower index."""
    if k == x.shape[-1]:  # everything is kept: no ties to break
        return x.topk(k, dim=-1, sorted=False)
    # One entry more than needed tells whether the k-th largest ties with the (k+1)-th without
    # another pass over x. Drop the (k+1)-th by moving the last of the k + 1 into its place.
    values, idx = x.topk(k + 1, dim=-1, sorted=False)
    low, pos = values.min(dim=-1, keepdim=True)
    values = values.scatter(-1, pos, values[..., k:])[..., :k]
    idx = idx.scatter(-1, pos, idx[..., k:])[..., :k]
    tied = values.min(dim=-1).values == low.squeeze(-1)
    if tied.any():  # keep all entries above the k-th value, then the tied ones in index order
        rows, kth = x[tied], low[tied]
        above, at = rows > kth, rows == kth
        fill = k - above.sum(dim=-1, keepdim=True)
        chosen = (above | (at & (at.cumsum(dim=-1) <= fill))).nonzero()[:, 1].view(-1, k)
        idx[tied] = chosen
        values[tied] = rows.gather(-1, chosen)
    return values, idx


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k largest entries along the last dim; ties go to the lower index."""
    return _topk(x, k)[1]


def _f(x: torch.Tensor, act: str) -> torch.Tensor:
    return torch.relu(x) if act == "relu" else x


class _AnnealedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, alpha, act):
        picked, idx = _topk(x, k)
        if alpha == 0.0:
            y = torch.zeros_like(x)
        else:
            y = _f(x, act) * alpha
        y.scatter_(-1, idx, _f(picked, act))  # alpha + (1 - alpha) * 1 = 1 on the kept entries
        # Saved for backward: the k indices (int16 when they fit), the sign of the kept entries for
        # relu, and a dense relu mask only while alpha > 0 needs the dense part's derivative.
        ctx.alpha, ctx.act, ctx.dim = alpha, act, x.shape[-1]
        small = idx.to(torch.int16) if x.shape[-1] <= torch.iinfo(torch.int16).max else idx
        live = picked > 0 if act == "relu" else None
        dense = (x > 0) if (act == "relu" and alpha != 0.0) else None
        ctx.save_for_backward(small, live, dense)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        small, live, dense = ctx.saved_tensors
        idx = small.long()
        picked = grad_y.gather(-1, idx)
        if live is not None:
            picked = picked * live
        if ctx.alpha == 0.0:
            grad_x = torch.zeros_like(grad_y)
        elif dense is not None:
            grad_x = grad_y * dense * ctx.alpha
        else:
            grad_x = grad_y * ctx.alpha
        grad_x.scatter_(-1, idx, picked)
        return grad_x, None, None, None


def topk_activation(x: torch.Tensor, k: int, alpha: float = 0.0, act: str = "relu") -> torch.Tensor:
    """Annealed TopK over the last dimension (eq. 3): f(x) * (alpha + (1 - alpha) * mask)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if not 1 <= k <= x.shape[-1]:
        raise ValueError(f"k must be in [1, {x.shape[-1]}], got {k}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return _AnnealedTopK.apply(x, k, float(alpha), act)


class TopK(nn.Module):
    """TopK activation of one layer. `alpha` is set by the trainer's annealing hook (and recorded in
    exported checkpoints); a forward pre-hook on this module sees the pre-activation."""

    def __init__(self, k: int, act: str = "relu"):
        super().__init__()
        self.k, self.act, self.alpha = k, act, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return topk_activation(x, self.k, self.alpha, self.act)

    def extra_repr(self) -> str:
        return f"k={self.k}, act={self.act}, alpha={self.alpha:g}"


def alpha(step: int, total_steps: int, ratio: float = 0.2, kind: str = "linear") -> float:
    """Annealing coefficient at optimizer step `step`: 1 at step 0, 0 from ratio * total_steps on.

    A pure function of the step, so a resumed run sees exactly the alpha of an uninterrupted one.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"anneal kind must be one of {SCHEDULES}, got {kind!r}")
    end = ratio * total_steps
    if step >= end:
        return 0.0
    t = step / end  # progress through the annealing phase, in [0, 1)
    if kind == "linear":
        return 1.0 - t
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "exponential":  # from 1 down to e^-5 (~0.0067), then 0 at the end
        return math.exp(-5.0 * t)
    return 1.0 - math.floor(4 * t) / 4  # step: a staircase 1, 0.75, 0.5, 0.25, then 0
