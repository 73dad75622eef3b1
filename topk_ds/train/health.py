"""The health of every TopK layer during training: mean L0 per token, and the share of neurons that
never fired in a window of optimizer steps."""

import torch
import torch.distributed as dist

from ..model.topk import TopK
from .distributed import mean_over_ranks


class TopKHealth:
    """Forward hooks on every TopK site, counting only training forwards."""

    def __init__(self, model, window: int):
        self.window = window
        self.layers = [i for i, site in enumerate(model.sites()) if isinstance(site, TopK)]
        self.l0 = torch.zeros(len(self.layers), dtype=torch.float64)
        self.tokens = torch.zeros(len(self.layers), dtype=torch.float64)
        self.fired: list[torch.Tensor | None] = [None] * len(self.layers)
        sites = model.sites()
        for j, layer in enumerate(self.layers):
            sites[layer].register_forward_hook(self._hook(j))

    def _hook(self, j):
        def record(module, inputs, out):
            if not module.training:
                return
            nonzero = out.detach().flatten(0, -2) != 0  # (tokens, width)
            self.l0[j] += nonzero.sum().item()
            self.tokens[j] += nonzero.shape[0]
            fired = nonzero.any(0)
            self.fired[j] = fired if self.fired[j] is None else self.fired[j] | fired
        return record

    def collect(self, step: int, device) -> dict:
        """Mean L0 of the step's tokens per layer; at the end of a window, the never-fired share."""
        if not self.layers:
            return {}
        l0 = mean_over_ranks((self.l0 / self.tokens.clamp(min=1)).to(device)).cpu()
        out = {f"topk/l0/layer{i}": float(v) for i, v in zip(self.layers, l0)}
        self.l0.zero_(), self.tokens.zero_()
        if step % self.window == 0 and all(f is not None for f in self.fired):
            fired = torch.stack(self.fired).to(device=device, dtype=torch.uint8)
            if dist.is_initialized():
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            dead = 1.0 - fired.float().mean(dim=1).cpu()
            out |= {f"topk/dead/layer{i}": float(v) for i, v in zip(self.layers, dead)}
            self.fired = [None] * len(self.layers)
        return out
