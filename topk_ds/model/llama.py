"""The TopK Llama, top to bottom: RMSNorm -> RoPE -> attention -> SwiGLU -> block -> model -> init.

With topk.enabled=False this is a plain Llama (same logits as transformers' LlamaForCausalLM with
the weights copied in). With TopK on, the first L - n_nontopk blocks pass their output hidden state
through `TopK`, so the residual stream they hand on is a k-sparse code. Every block's activation
module (`layer.act`, an `nn.Identity` in dense blocks) is the intervention point: its input is the
pre-activation, so a forward pre-hook can steer a neuron, a forward hook can record it.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .args import ModelConfig, TopKConfig
from .topk import TopK


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 and cast back before the gain, as Llama does
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim / 2,) and the factor on cos and sin. `scaling` (ModelConfig.rope_scaling)
    extends the context as transformers' rope utils do, with the same names and numbers: linear (position
    interpolation), llama3 (Llama 3.1: interpolate the low frequencies only, a smooth band between) and yarn
    (a ramp from extrapolated to interpolated frequencies, and an attention temperature on cos and sin)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "default":
        return inv_freq, 1.0
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = scaling["original_max_position_embeddings"]  # the context the model was trained at
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if high == low else high
    extrapolated = 1 - ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    inv_freq = (1.0 / (factor * theta**exponents)) * (1 - extrapolated) + inv_freq * extrapolated
    return inv_freq, attention_factor


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim) for the given positions, in fp32; the half-split (rotate_half) layout."""
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over a whole sequence: q (B, H, T, head_dim), k and v (B, KV, T, head_dim) with KV
    dividing H (GQA) -> (B, H, T, head_dim). The model's default `attend`; a sequence-parallel trainer swaps
    in one with the same contract whose T is the rank's slice of a longer sequence (Transformer.set_attention)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attend = causal_attention  # (q, k, v) -> out, all (B, heads, T, head_dim); see Transformer.set_attention

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attend(q, k, v) if cache is None else self._cached(q, k, v, cache)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def _cached(self, q, k, v, cache):
        """Generation: a Hugging Face Cache returns the keys/values of all positions so far."""
        k, v = cache.update(k, v, self.layer_id)
        T, S = q.shape[2], k.shape[2]
        gqa = self.n_kv_heads != self.n_heads
        if S == T:  # never self.attend: a sequence-parallel one has no place in generation
            out = causal_attention(q, k, v)
        elif T == 1:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # several new tokens after a cached prefix: causal with an offset
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out


class FeedForward(nn.Module):
    """SwiGLU: w2(act(silu(w1 x) * w3 x)); `act` is the TopK of the mlp-site ablation and an identity
    otherwise. w1 and w3 stay two matmuls: fused, the halves of the output are strided views whose
    elementwise ops and backward cost more on CPU than the fusion saves (bench/bench_model.py)."""

    def __init__(self, dim: int, ffn_dim: int, act: nn.Module):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)
        self.act = act

    def forward(self, x):
        return self.w2(self.act(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig, topk: TopKConfig):
        super().__init__()
        sparse = topk.is_topk_layer(layer_id, cfg.n_layers)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        mlp_act = TopK(topk.k, topk.act) if sparse and topk.site == "mlp" else nn.Identity()
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, mlp_act)
        self.act = TopK(topk.k, topk.act) if sparse and topk.site == "residual" else nn.Identity()

    def forward(self, x, cos, sin, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return self.act(h + self.feed_forward(self.ffn_norm(h)))


def no_gather(params):
    return contextlib.nullcontext()


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, topk: TopKConfig | None = None):
        super().__init__()
        self.cfg, self.topk = cfg, topk or TopKConfig(enabled=False)
        self.activation_checkpointing = False  # recompute each block in backward (set by the trainer)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg, self.topk) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None, start: int = 0):
        """tokens (B, T) -> logits (B, T, V); with targets, the mean cross-entropy instead. `start` is the
        position of tokens[:, 0] (a sequence-parallel rank runs the slice of the sequence that begins there);
        with a cache, the cached length."""
        start = cache.get_seq_length() if cache is not None else start
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        h = self.tok_embeddings(tokens)
        cos, sin = (t.to(h.dtype) for t in rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta,
                                                        self.cfg.rope_scaling))
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache)
        logits = self.output(self.norm(h))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def set_attention(self, attend) -> None:
        """Run every layer's attention core with `attend(q, k, v)` (the contract of `causal_attention`), e.g.
        one that spreads a sequence over ranks; the model itself never communicates."""
        for layer in self.layers:
            layer.attention.attend = attend

    def compile_blocks(self, **options) -> None:
        """torch.compile each block in place (parameter names unchanged); hooks on the model and the
        loss stay eager. `options` go to torch.compile (e.g. backend)."""
        for layer in self.layers:
            layer.compile(**options)

    def sites(self) -> list[nn.Module]:
        """The activation module of every layer at the configured TopK site: neuron `l:i` is entry
        i of the input (pre-activation) or output (activation) of sites()[l]."""
        if self.topk.site == "mlp":
            return [layer.feed_forward.act for layer in self.layers]
        return [layer.act for layer in self.layers]

    def topk_modules(self) -> list[TopK]:
        return [m for m in self.modules() if isinstance(m, TopK)]

    def set_alpha(self, alpha: float) -> None:
        for m in self.topk_modules():
            m.alpha = alpha

    @torch.no_grad()
    def init_weights(self, gather=no_gather) -> None:
        """Normal(0, init_std) inputs, output projections (wo, w2) scaled by 1/sqrt(2L), unit norms.
        `gather(params)` is a context that makes sharded parameters whole (ZeRO-3) while they are set."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        with gather([self.tok_embeddings.weight]):
            nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            with gather(list(layer.parameters())):
                nn.init.normal_(layer.attention.wqkv.weight, std=std)
                nn.init.normal_(layer.attention.wo.weight, std=out_std)
                nn.init.normal_(layer.feed_forward.w1.weight, std=std)
                nn.init.normal_(layer.feed_forward.w3.weight, std=std)
                nn.init.normal_(layer.feed_forward.w2.weight, std=out_std)
                nn.init.ones_(layer.attention_norm.weight)
                nn.init.ones_(layer.ffn_norm.weight)
        with gather([self.norm.weight, self.output.weight]):
            nn.init.ones_(self.norm.weight)
            if not self.cfg.tie_embeddings:
                nn.init.normal_(self.output.weight, std=std)
