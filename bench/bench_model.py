"""The model's speed on CPU, 2 threads, each figure against its peer in the same run:
(a) TopK activation fwd+bwd vs ReLU (fp32), and compiled by inductor vs eager on bf16 input with
    ties (the outputs and gradients must equal eager's bit for bit); (b) our dense Transformer vs
    transformers' LlamaForCausalLM computing the same function; (c) the TopK model vs its dense twin,
    in fp32 and in bf16, where the TopK inputs tie at the k-th value in many rows (the share is given).

    python bench/bench_model.py [--quick]
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Figure, main, timeit_pair  # noqa: E402
from topk_ds.model import ModelConfig, TopKConfig, Transformer, topk_activation  # noqa: E402

SHAPE = ModelConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=688, vocab_size=4096, max_seq_len=256)
BATCH, SEQ = 4, 256
BF16_BATCH, BF16_SEQ = 2, 128  # bf16 matmuls are ~25x slower on CPUs without bf16 units


def ms(seconds: float) -> float:
    return seconds * 1e3


def activation_figures(repeats: int) -> list[Figure]:
    figures = []
    for dim in (1024, 2048):
        x = torch.randn(4096, dim, requires_grad=True)
        grad = torch.randn(4096, dim)

        def topk():
            x.grad = None
            topk_activation(x, 64).backward(grad)

        def relu():
            x.grad = None
            torch.relu(x).backward(grad)

        ours, peer = timeit_pair(topk, relu, repeats, warmup=2)
        figures.append(Figure(f"topk_activation fwd+bwd, 4096 x {dim}, k=64", ms(ours), "ms", "relu fwd+bwd",
                              ms(peer), ours / peer, "time vs peer (lower is better)"))
    return figures + [compiled_figure(repeats)]


def compiled_figure(repeats: int) -> Figure:
    """topk_activation through torch.compile(fullgraph=True) (inductor) vs eager, bf16 input with ties."""
    x = (torch.randint(-8, 9, (4096, 1024)) / 4).bfloat16().requires_grad_()
    grad = torch.randn(4096, 1024).bfloat16()
    compiled = torch.compile(topk_activation, fullgraph=True)
    results = []
    for fn in (topk_activation, compiled):
        x.grad = None
        y = fn(x, 64, 0.25)
        y.backward(grad)
        results.append((y, x.grad))
    equal = all(torch.equal(a, b) for a, b in zip(*results))

    def run(fn):
        def once():
            x.grad = None
            fn(x, 64, 0.25).backward(grad)
        return once

    ours, peer = timeit_pair(run(compiled), run(topk_activation), repeats, warmup=2)
    return Figure(f"topk_activation fwd+bwd compiled (inductor, fullgraph), 4096 x 1024 bf16 with ties, alpha=0.25, "
                  f"equal to eager bit for bit: {'yes' if equal else 'NO'}", ms(ours), "ms", "eager", ms(peer), ours / peer,
                  "time vs peer (lower is better)")


def hf_llama(model: Transformer):
    """transformers' Llama with our weights (the key map of tests/test_model.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa"))
    q, kv = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.attention.wqkv.weight.split((q, kv, kv))
        w1, w3 = layer.feed_forward.w1.weight, layer.feed_forward.w3.weight
        sd.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk, p + "self_attn.v_proj.weight": wv,
                   p + "self_attn.o_proj.weight": layer.attention.wo.weight, p + "mlp.gate_proj.weight": w1,
                   p + "mlp.up_proj.weight": w3, p + "mlp.down_proj.weight": layer.feed_forward.w2.weight,
                   p + "input_layernorm.weight": layer.attention_norm.weight,
                   p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    return hf.train()


def step(model, tokens, targets, logits_of):
    """One training forward + backward with the same loss for both models."""
    model.zero_grad(set_to_none=True)
    logits = logits_of(model, tokens)
    F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()


def ours_logits(model, tokens):
    return model(tokens)


def hf_logits(model, tokens):
    return model(input_ids=tokens).logits


def model_figures(repeats: int) -> list[Figure]:
    tokens, targets = torch.randint(0, SHAPE.vocab_size, (2, BATCH, SEQ))
    dense = Transformer(SHAPE).train()
    hf = hf_llama(dense)
    with torch.no_grad():  # the same function, or the comparison means nothing
        assert (dense(tokens) - hf_logits(hf, tokens)).abs().max().item() < 1e-4
    ours, peer = timeit_pair(lambda: step(dense, tokens, targets, ours_logits),
                             lambda: step(hf, tokens, targets, hf_logits), repeats, warmup=2)
    what = f"D={SHAPE.dim} L={SHAPE.n_layers} seq {SEQ} batch {BATCH}"
    figures = [Figure(f"dense Transformer fwd+bwd, {what}", ms(ours), "ms", "transformers LlamaForCausalLM",
                      ms(peer), ours / peer, "time vs peer (lower is better)", "<= 1.0")]

    topk = Transformer(SHAPE, TopKConfig(k=64, n_nontopk=2)).train()
    topk.load_state_dict(dense.state_dict())
    for alpha in (0.0, 0.5):
        topk.set_alpha(alpha)
        ours, peer = timeit_pair(lambda: step(topk, tokens, targets, ours_logits),
                                 lambda: step(dense, tokens, targets, ours_logits), repeats, warmup=2)
        figures.append(Figure(f"TopK model (k=64 on 2 of 4 blocks, alpha={alpha:g}) fwd+bwd, {what}", ms(ours),
                              "ms", "dense twin", ms(peer), ours / peer, "time vs peer (lower is better)", "<= 1.05"))

    # bf16: the TopK inputs tie at the k-th value in many rows, the case the sync-free selection is for
    topk, dense = topk.bfloat16(), dense.bfloat16()
    topk.set_alpha(0.0)
    tokens, targets = tokens[:BF16_BATCH, :BF16_SEQ], targets[:BF16_BATCH, :BF16_SEQ]
    tie_share = []
    hook = topk.layers[0].act.register_forward_pre_hook(lambda m, args: tie_share.append(kth_ties(args[0], 64)))
    ours, peer = timeit_pair(lambda: step(topk, tokens, targets, ours_logits),
                             lambda: step(dense, tokens, targets, ours_logits), max(3, repeats // 5), warmup=1)
    hook.remove()
    figures.append(Figure(f"TopK model (k=64 on 2 of 4 blocks, alpha=0) fwd+bwd in bf16, {tie_share[0]:.0%} of the TopK "
                          f"inputs tie at the k-th value, D={SHAPE.dim} L={SHAPE.n_layers} seq {BF16_SEQ} batch {BF16_BATCH}",
                          ms(ours), "ms", "dense twin", ms(peer), ours / peer, "time vs peer (lower is better)", "<= 1.05"))
    return figures


def kth_ties(x: torch.Tensor, k: int) -> float:
    """Share of rows whose k-th and (k+1)-th largest values are equal."""
    top = x.detach().float().topk(k + 1, dim=-1).values
    return (top[..., k - 1] == top[..., k]).float().mean().item()


def run(quick: bool) -> list[Figure]:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    repeats = 5 if quick else 30
    return activation_figures(repeats) + model_figures(repeats)


if __name__ == "__main__":
    main("model", run)
