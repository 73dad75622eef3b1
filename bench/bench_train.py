"""Training step cost on this CPU (fp32, one rank, ds_configs/cpu.json):
tokens/s of the tiny and a D=256/L=4 model through the DeepSpeed engine; the engine step against a
plain PyTorch loop of the same model (AdamW, same groups, clipping); the TopK step against the dense
step of the same shape. Times are medians of interleaved steps."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Figure, main, timeit_pair  # noqa: E402
from topk_ds.config import load_config  # noqa: E402
from topk_ds.model import Transformer  # noqa: E402
from topk_ds.train.distributed import discover_ranks  # noqa: E402


def config(dim, layers, heads, ffn, seq, batch, topk=True):
    cfg = load_config("tiny" if topk else "tiny-dense", [
        f"model.dim={dim}", f"model.n_layers={layers}", f"model.n_heads={heads}", f"model.ffn_dim={ffn}",
        "model.vocab_size=4096", f"model.max_seq_len={seq}", f"data.seq_len={seq}", f"train.micro_batch={batch}",
        "train.steps=1000", f"topk.k={min(64, dim // 4)}"])
    return cfg


def engine_step(cfg):
    from topk_ds.train.engine import Engine

    engine = Engine(cfg)
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len + 1))
    return lambda: engine.micro_step(batch)


def plain_step(cfg):
    """The same model, optimizer groups and clipping, without DeepSpeed."""
    from topk_ds.train.engine import param_groups

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model, cfg.topk)
    optim = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=cfg.train.betas)
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len + 1))

    def step():
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optim.step()
        optim.zero_grad(set_to_none=True)
    return step


def run(quick: bool):
    torch.set_num_threads(2)
    os.environ.setdefault("WANDB_MODE", "disabled")
    discover_ranks()
    from topk_ds.train.engine import init_distributed

    init_distributed()
    repeats = 3 if quick else 8
    figures = []
    shapes = {"tiny (D=64, L=4, seq 64, batch 8)": (64, 4, 4, 128, 64, 8),
              "D=256, L=4, seq 256, batch 4": (256, 4, 4, 688, 256, 4)}
    for name, shape in shapes.items():
        topk, dense = config(*shape), config(*shape, topk=False)
        tokens = shape[4] * shape[5]
        t_engine, t_plain = timeit_pair(engine_step(topk), plain_step(topk), repeats=repeats, warmup=2)
        figures.append(Figure(f"engine tokens/s, TopK {name}", tokens / t_engine, "tokens/s", "plain PyTorch loop",
                              tokens / t_plain, t_engine / t_plain, "engine step time / plain step time",
                              "<= 1.15" if shape[0] == 256 else ""))
        t_topk, t_dense = timeit_pair(engine_step(topk), engine_step(dense), repeats=repeats, warmup=2)
        figures.append(Figure(f"TopK step, {name}", t_topk * 1e3, "ms", "dense step, same shape", t_dense * 1e3,
                              t_topk / t_dense, "TopK / dense step time", "<= 1.05" if shape[0] == 256 else ""))
    return figures


if __name__ == "__main__":
    main("train", run)
