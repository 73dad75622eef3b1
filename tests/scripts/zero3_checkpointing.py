"""Under `deepspeed --num_gpus 2`: the tiny TopK model under ZeRO-3 (fp32 on CPU ranks), built twice
with the same seed, without and with activation checkpointing; the same micro-batches through each.
Rank 0 prints {"plain": [...], "checkpointed": [...]}: per optimizer step the loss and grad norm."""

import json

import torch

from topk_ds.config import load_config
from topk_ds.train.distributed import discover_ranks, rank
from topk_ds.train.engine import Engine, init_distributed

discover_ranks()
init_distributed()
results = {}
for name, checkpointing in (("plain", False), ("checkpointed", True)):
    cfg = load_config("tiny", ["model.vocab_size=128", "train.ds_config=ds_configs/zero3_bf16.json", "train.precision=fp32",
                               "train.grad_accum=2", "train.steps=10", "train.wandb=disabled",
                               f"train.activation_checkpointing={str(checkpointing).lower()}"])
    engine = Engine(cfg)
    data = torch.Generator().manual_seed(rank())
    steps = []
    for _ in range(3):
        losses = [engine.micro_step(torch.randint(0, 128, (8, 65), generator=data)).item() for _ in range(2)]
        steps.append([*losses, float(engine.step_report()["grad_norm"])])
    results[name] = steps
if rank() == 0:
    print(json.dumps(results))
