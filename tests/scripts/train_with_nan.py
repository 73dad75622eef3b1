"""Train through the real loop with the loss forced to NaN on chosen micro-steps (test-side fault
injection: the library has no such switch). Usage: train_with_nan.py NAN_CALLS CONFIG [--set ...]"""

import sys

from topk_ds.cli import main
from topk_ds.model.llama import Transformer

nan_calls = {int(c) for c in sys.argv[1].split(",")}
calls = 0
forward = Transformer.forward


def poisoned(self, tokens, targets=None, **kwargs):
    global calls
    out = forward(self, tokens, targets, **kwargs)
    if targets is not None and self.training:
        calls += 1
        if calls in nan_calls:
            out = out * float("nan")
    return out


Transformer.forward = poisoned
main(["train", "--config", *sys.argv[2:]])
