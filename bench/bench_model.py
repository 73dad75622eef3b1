"""The model's speed on CPU, fp32, 2 threads, each figure against its peer in the same run:
(a) TopK activation fwd+bwd vs ReLU; (b) our dense Transformer vs transformers' LlamaForCausalLM
computing the same function; (c) the TopK model vs its dense twin.

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
    return figures


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
    return figures


def run(quick: bool) -> list[Figure]:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    repeats = 5 if quick else 30
    return activation_figures(repeats) + model_figures(repeats)


if __name__ == "__main__":
    main("model", run)
