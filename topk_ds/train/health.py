"""The health of every TopK layer during training: mean L0 per token, and the share of neurons that
never fired in a window of optimizer steps.

The hooks only add to counters that live on the device (no host sync per layer per micro-step, and
torch.compile can trace them inside a compiled block); `collect` reads them once per optimizer step.
"""

import torch
import torch.distributed as dist

from ..model.topk import TopK
from .distributed import mean_over_ranks


class TopKHealth:
    """Forward hooks on every TopK site, counting only training forwards."""

    def __init__(self, model, window: int):
        self.window = window
        sites = model.sites()
        self.layers = [i for i, site in enumerate(sites) if isinstance(site, TopK)]
        if not self.layers:
            return
        device = sites[self.layers[0]].alpha_tensor.device
        self.counts = torch.zeros(len(self.layers), 2, dtype=torch.int64, device=device)  # (non-zeros, tokens)
        self.fired = torch.zeros(len(self.layers), model.topk.width(model.cfg), dtype=torch.bool, device=device)
        for j, layer in enumerate(self.layers):
            sites[layer].register_forward_hook(self._hook(self.counts[j], self.fired[j]))

    @staticmethod
    def _hook(counts: torch.Tensor, fired: torch.Tensor):
        # views of this layer's rows, not an index: compiled blocks then share one graph
        def record(module, inputs, out):
            if not module.training:
                return
            nonzero = out.detach().flatten(0, -2) != 0  # (tokens, width)
            counts[0] += nonzero.sum()
            counts[1] += nonzero.shape[0]
            fired.logical_or_(nonzero.any(0))
        return record

    def collect(self, step: int) -> dict:
        """Mean L0 of the step's tokens per layer; at the end of a window, the never-fired share."""
        if not self.layers:
            return {}
        values = mean_over_ranks(self.counts[:, 0].double() / self.counts[:, 1].clamp(min=1))
        self.counts.zero_()
        names = [f"topk/l0/layer{i}" for i in self.layers]
        if step % self.window == 0:
            fired = self.fired.to(torch.uint8)
            if dist.is_initialized():
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            values = torch.cat([values, 1.0 - fired.double().mean(dim=1)])
            names += [f"topk/dead/layer{i}" for i in self.layers]
            self.fired.zero_()
        return dict(zip(names, values.tolist()))  # the one host sync of the step
