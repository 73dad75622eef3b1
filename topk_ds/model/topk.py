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


# Bits of +inf of each float type whose values become integer keys (NaN bits lie above them).
_INF_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.bfloat16: (torch.int16, 0x7F80),
             torch.float16: (torch.int16, 0x7C00)}


def _selection_keys(x: torch.Tensor) -> torch.Tensor:
    """Distinct integer keys with the order of (value, -index) along the last dim, so one top-k over
    them picks the k largest values with ties to the lower index: no tie test, no host sync, no
    data-dependent shape. key = v * 2^b + (D - 1 - i), where v is an integer with the order of the
    value (its magnitude bits, negated for negative values: -0.0 ties with 0.0, every NaN ranks above
    +inf as in torch.topk) and b bits hold the index. 16-bit values fit int32 keys up to D = 2^16,
    32-bit values int64 keys up to D = 2^32."""
    D = x.shape[-1]
    itype, inf = _INF_BITS[x.dtype]
    index_bits = max(1, (D - 1).bit_length())
    ktype = torch.int32 if 8 * x.element_size() + index_bits <= 32 else torch.int64
    # in place on one integer tensor: each fresh full-size tensor would cost a pass and page faults
    key = x.view(itype).to(ktype)
    key.bitwise_and_(torch.iinfo(itype).max).clamp_(max=inf + 1)  # magnitude; every NaN one above +inf
    key.addcmul_(key, (x < 0).view(torch.int8), value=-2)  # negated for negative values (not -0.0, not NaN)
    return key.mul_(1 << index_bits).add_(torch.arange(D - 1, -1, -1, device=x.device, dtype=ktype))


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices (..., k) of the k largest entries along the last dim; ties go to the lower
    index. The indices come in no particular order."""
    if x.dtype in _INF_BITS:
        idx = _selection_keys(x).topk(k, dim=-1, sorted=False).indices
    else:  # float64 (gradcheck): a stable sort keeps equal values in index order
        idx = x.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return x.gather(-1, idx), idx


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k largest entries along the last dim; ties go to the lower index."""
    return _topk(x, k)[1]


def _f(x: torch.Tensor, act: str) -> torch.Tensor:
    return torch.relu(x) if act == "relu" else x


class _AnnealedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, alpha, act, dense):
        # alpha: a 0-dim tensor in x's dtype; dense: whether alpha > 0, which the caller knows
        # without reading the tensor (no host sync, and compiled code does not bake alpha in).
        picked, idx = _topk(x, k)
        y = _f(x, act) * alpha if dense else torch.zeros_like(x)
        y.scatter_(-1, idx, _f(picked, act))  # alpha + (1 - alpha) * 1 = 1 on the kept entries
        # Saved for backward: the k indices (int16 when they fit), the sign of the kept entries for
        # relu, and a dense relu mask only while alpha > 0 needs the dense part's derivative.
        ctx.dense = dense
        small = idx.to(torch.int16) if x.shape[-1] <= torch.iinfo(torch.int16).max else idx
        live = picked > 0 if act == "relu" else None
        mask = (x > 0) if (act == "relu" and dense) else None
        ctx.save_for_backward(small, live, mask, alpha if dense else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        small, live, mask, alpha = ctx.saved_tensors
        idx = small.long()
        picked = grad_y.gather(-1, idx)
        if live is not None:
            picked = picked * live
        if not ctx.dense:
            grad_x = torch.zeros_like(grad_y)
        elif mask is not None:
            grad_x = grad_y * mask * alpha
        else:
            grad_x = grad_y * alpha
        grad_x.scatter_(-1, idx, picked)
        return grad_x, None, None, None, None


def _check(x: torch.Tensor, k: int, alpha: float, act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if not 1 <= k <= x.shape[-1]:
        raise ValueError(f"k must be in [1, {x.shape[-1]}], got {k}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def topk_activation(x: torch.Tensor, k: int, alpha: float = 0.0, act: str = "relu") -> torch.Tensor:
    """Annealed TopK over the last dimension (eq. 3): f(x) * (alpha + (1 - alpha) * mask), alpha
    applied in x's dtype."""
    _check(x, k, alpha, act)
    return _AnnealedTopK.apply(x, k, torch.tensor(alpha, dtype=x.dtype), act, alpha > 0)


class TopK(nn.Module):
    """TopK activation of one layer. `alpha` is set by the trainer's annealing hook (and recorded in
    exported checkpoints); a forward pre-hook on this module sees the pre-activation.

    alpha's value lives in a buffer that is set in place, so compiled code reads it instead of baking
    in a constant (no recompilation at every annealing step); only `annealing` (alpha > 0), which
    changes once per run, selects the code path."""

    def __init__(self, k: int, act: str = "relu"):
        super().__init__()
        self.k, self.act = k, act
        self.register_buffer("alpha_tensor", torch.zeros(()), persistent=False)
        self.alpha = 0.0

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {value}")
        self._alpha, self.annealing = float(value), value > 0
        self.alpha_tensor.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _AnnealedTopK.apply(x, self.k, self.alpha_tensor.to(x.dtype), self.act, self.annealing)

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
