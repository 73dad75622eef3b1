"""Run by tests/test_long.py on 2 CPU ranks (torch.multiprocessing.spawn), in a module of its own so the
spawned processes import only torch, DeepSpeed and topk_ds."""

import os

import torch

from topk_ds.model import ModelConfig, TopKConfig, Transformer

# 4 heads over 2 KV heads (GQA), YaRN-scaled RoPE: the slices must see their global positions
MODEL = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64,
                    rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
COLLECTIVES = ("all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "broadcast", "send", "recv", "isend", "irecv")


def _count_collectives(counts: dict):
    """Patch torch.distributed's collectives (DeepSpeed's comm calls them by attribute) to count calls and
    elements of their first tensor argument; returns a function that undoes the patch."""
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name, fn):
        def call(*args, **kwargs):
            tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            calls, elements = counts.get(name, (0, 0))
            counts[name] = (calls + 1, elements + (tensor.numel() if tensor is not None else 0))
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    return lambda: [setattr(dist, name, fn) for name, fn in originals.items()]


def run(rank: int, port: int) -> None:
    """One of 2 CPU ranks: the whole-sequence loss and gradients computed alone are the reference; then the
    same model runs its half of the positions with DeepSpeed's DistributedAttention over both ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from topk_ds.train.engine import init_distributed, ulysses_attention

    init_distributed()
    group = dist.new_group([0, 1])
    counts = {}
    for name, topk in (("topk", TopKConfig(k=8, n_nontopk=1)), ("dense", TopKConfig(enabled=False))):
        torch.manual_seed(0)
        model = Transformer(MODEL, topk)
        tokens = torch.randint(0, MODEL.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        whole = model(inputs, targets)
        whole.backward()
        reference = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()

        model.set_attention(ulysses_attention(group))
        T, start = 16, 16 * rank
        counts[name] = {}
        restore = _count_collectives(counts[name])
        share = model(inputs[:, start:start + T], targets[:, start:start + T], start=start) / 2
        share.backward()
        restore()
        loss = share.detach()
        dist.all_reduce(loss)
        torch.testing.assert_close(loss, whole.detach(), rtol=1e-6, atol=1e-6)
        for p, expected in zip(model.parameters(), reference):
            dist.all_reduce(p.grad)  # what ZeRO's reduction over the sequence-parallel ranks adds up
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
    # TopK acts per token on the hidden state each rank holds whole: no communication of its own, only
    # Ulysses' four all-to-alls (q, k, v, output) per layer forward and four backward, the same bytes
    assert counts["topk"] == counts["dense"], counts
    assert set(counts["topk"]) == {"all_to_all_single"} and counts["topk"]["all_to_all_single"][0] == 8 * 3, counts
    dist.destroy_process_group()
