"""The TopK Llama: parity with transformers' Llama in dense mode, causality, TopK layers, steering
point, init, parameter and FLOP counts."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from topk_ds.model import ModelConfig, TopK, TopKConfig, Transformer

V = 97


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"dim": 64, "n_layers": 3, "n_heads": 4, "ffn_dim": 96, "vocab_size": V, "max_seq_len": 64, **kw})


def copy_into_hf_llama(model: Transformer) -> LlamaForCausalLM:
    """The key map from our fused layout to transformers' Llama."""
    c = model.cfg
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta} | (c.rope_scaling or {}),
        attention_bias=False, mlp_bias=False))
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
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return hf.eval()


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_dense_matches_transformers_llama(kv_heads):
    model = Transformer(tiny(n_kv_heads=kv_heads)).eval()
    for p in model.parameters():  # non-trivial norm gains too
        p.data.add_(0.05 * torch.randn_like(p))
    hf = copy_into_hf_llama(model)
    tokens = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_loss_is_cross_entropy_of_logits():
    model = Transformer(tiny(), TopKConfig(k=8))
    tokens = torch.randint(0, V, (2, 16))
    targets = torch.randint(0, V, (2, 16))
    logits = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model(tokens, targets), expected)


@pytest.mark.parametrize("site", ["residual", "mlp"])
def test_causal(site):
    model = Transformer(tiny(), TopKConfig(k=8, site=site)).eval()
    a = torch.randint(0, V, (1, 24))
    b = a.clone()
    b[0, 15:] = torch.randint(0, V, (9,))
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :15], lb[:, :15], rtol=0, atol=0)
    assert not torch.allclose(la[:, 15:], lb[:, 15:])


def test_topk_layers_are_the_first_L_minus_n():
    model = Transformer(tiny(n_layers=5), TopKConfig(k=8, n_nontopk=2))
    assert [isinstance(layer.act, TopK) for layer in model.layers] == [True, True, True, False, False]
    dense = Transformer(tiny(n_layers=5), TopKConfig(enabled=False))
    assert not dense.topk_modules()
    mlp = Transformer(tiny(n_layers=5), TopKConfig(k=8, site="mlp", n_nontopk=0))
    assert all(isinstance(layer.feed_forward.act, TopK) and not isinstance(layer.act, TopK) for layer in mlp.layers)


def test_topk_hidden_states_are_k_sparse():
    model = Transformer(tiny(), TopKConfig(k=8, n_nontopk=1)).eval()
    seen = {}
    for i, site in enumerate(model.sites()):
        site.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, out))
    model(torch.randint(0, V, (2, 16)))
    assert ((seen[0] != 0).sum(-1) <= 8).all() and ((seen[1] != 0).sum(-1) <= 8).all()
    assert (seen[0] >= 0).all()  # relu
    assert ((seen[2] != 0).sum(-1) > 8).all()  # the dense last layer


def test_alpha_one_is_dense_relu():
    model = Transformer(tiny(), TopKConfig(k=8, n_nontopk=2))
    model.set_alpha(1.0)
    out = {}
    model.layers[0].act.register_forward_hook(lambda m, i, o: out.update(pre=i[0], post=o))
    model(torch.randint(0, V, (1, 8)))
    torch.testing.assert_close(out["post"], torch.relu(out["pre"]))


def test_steering_hook_changes_exactly_one_neuron():
    model = Transformer(tiny(), TopKConfig(k=8)).eval()
    tokens = torch.randint(0, V, (2, 12))
    pre = {}
    site = model.sites()[1]
    site.register_forward_hook(lambda m, inp, out: pre.__setitem__(len(pre), inp[0].clone()))
    model(tokens)

    def steer(module, inputs):
        x = inputs[0].clone()
        x[..., 7] += 5.0
        return (x,)

    handle = site.register_forward_pre_hook(steer)
    model(tokens)
    handle.remove()
    diff = pre[1] - pre[0]
    torch.testing.assert_close(diff[..., 7], torch.full_like(diff[..., 7], 5.0))
    assert diff[..., :7].abs().max() == 0 and diff[..., 8:].abs().max() == 0


def test_init_weights_scales_output_projections():
    cfg = tiny(dim=128, n_layers=8, ffn_dim=256, n_heads=4)
    model = Transformer(cfg)
    std = cfg.init_std
    assert model.layers[0].attention.wqkv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(std / 4, rel=0.05)
    assert (model.layers[3].ffn_norm.weight == 1).all()


@pytest.mark.parametrize("tied", [False, True])
def test_param_count(tied):
    cfg = tiny(n_kv_heads=2, tie_embeddings=tied)
    model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert (model.output.weight is model.tok_embeddings.weight) == tied


def test_flops_per_token_by_hand():
    # D=64, F=96, L=3, V=97, MHA: per layer 4*64*64 + 3*64*96 = 34816 weights; head 97*64 = 6208
    cfg = tiny()
    matmul = 3 * 34816 + 6208
    assert cfg.flops_per_token(32, training=False) == 2 * matmul + 4 * 3 * 32 * 64
    assert cfg.flops_per_token(32) == 3 * (2 * matmul + 4 * 3 * 32 * 64)


def test_activation_checkpointing_gives_same_gradients():
    model = Transformer(tiny(), TopKConfig(k=8)).train()
    tokens = torch.randint(0, V, (2, 16))
    model(tokens, tokens).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(tokens, tokens).backward()
    for a, b in zip(plain, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)
