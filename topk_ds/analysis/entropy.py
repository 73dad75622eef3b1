"""Token entropy and semantic entropy of every neuron of a layer (the paper's eq. 4-11).

Inputs are over the token ids seen in the data: abar (V', D) the mean activation of each neuron per
token id (non-negative), freq (V',) the corpus counts, and the input-embedding rows (V', E).

    token entropy     p(v) = abar(v) / sum_v' abar(v'),  H = -sum_v p log p          (max log V')
    semantic entropy  theta = ratio x the percentile-th percentile of abar(.)
                      S = {v : abar(v) > theta}; every pair u != v in S adds freq(u) freq(v) to the
                      bin of cos(e_u, e_v) among `bins` equal bins over [-1, 1]; H of the normalised
                      histogram (max log bins). NaN when |S| < 2.

Natural log throughout. Percentiles interpolate linearly (numpy's default).
"""

import torch

from .settings import BINS, PERCENTILE, THRESHOLD_RATIO


def token_entropy(abar: torch.Tensor) -> torch.Tensor:
    """(V', D) -> (D,); NaN for a neuron that never fired."""
    total = abar.sum(0, dtype=torch.float64)
    h = torch.special.entr(abar.double() / total).sum(0)
    return h.masked_fill(total == 0, float("nan")).float()


def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """(n, D) -> (D,): the q-th percentile of each column, linear interpolation between order statistics."""
    pos = q / 100 * (x.shape[0] - 1)
    lo = int(pos)
    hi = min(lo + 1, x.shape[0] - 1)
    low = x.kthvalue(lo + 1, dim=0).values
    return low + (pos - lo) * (x.kthvalue(hi + 1, dim=0).values - low)


def cosine_bins(embedding: torch.Tensor, bins: int, block: int = 4096) -> torch.Tensor:
    """(V', V') uint8: the bin of cos(e_u, e_v) among `bins` equal bins over [-1, 1] (cos = 1 in the last)."""
    if not 1 <= bins <= 255:
        raise ValueError(f"bins must be in [1, 255], got {bins}")
    unit = torch.nn.functional.normalize(embedding.float(), dim=1)
    table = torch.empty(len(unit), len(unit), dtype=torch.uint8)
    for start in range(0, len(unit), block):
        cos = unit[start:start + block] @ unit.T
        table[start:start + block] = ((cos + 1) * (bins / 2)).floor_().clamp_(0, bins - 1)
    return table


def semantic_entropy(abar: torch.Tensor, freq: torch.Tensor, embedding: torch.Tensor,
                     percentile_q: float = PERCENTILE, ratio: float = THRESHOLD_RATIO, bins: int = BINS,
                     table: torch.Tensor | None = None, block: int = 1024):
    """-> (entropy (D,) NaN where |S| < 2, |S| (D,), theta (D,)). `table` is cosine_bins(embedding, bins)
    when the caller already has it (it costs V'^2 bytes and V'^2 E multiply-adds)."""
    theta = ratio * percentile(abar, percentile_q)
    table = cosine_bins(embedding, bins) if table is None else table
    above = abar > theta
    size = above.sum(0)
    freq = freq.double()
    out = torch.full((abar.shape[1],), float("nan"))
    for i in (size >= 2).nonzero().flatten().tolist():
        s = above[:, i].nonzero().flatten()
        hist = torch.zeros(bins, dtype=torch.float64)
        for start in range(0, len(s), block):  # |S| x |S| pairs, a block of rows at a time (bounded memory)
            rows = s[start:start + block]
            hist += torch.bincount(table[rows[:, None], s[None, :]].flatten(),
                                   (freq[rows, None] * freq[None, s]).flatten(), minlength=bins)
        hist -= torch.bincount(table[s, s], freq[s] ** 2, minlength=bins)  # pairs u != v only
        out[i] = torch.special.entr(hist / hist.sum()).sum()
    return out, size, theta
