"""The model's two configuration dataclasses. Pure Python: this package (topk_ds.model) is copied
into every exported Hugging Face directory and must import nothing but torch and itself."""

from dataclasses import dataclass


@dataclass
class ModelConfig:
    dim: int = 1024  # hidden size D: width of the residual stream, i.e. of the TopK code
    n_layers: int = 8  # transformer blocks L
    n_heads: int = 16  # attention heads (our default: the paper's number was lost)
    n_kv_heads: int | None = None  # key/value heads for GQA; None means n_heads (plain MHA)
    ffn_dim: int = 2816  # SwiGLU hidden width, its own setting: widening D keeps it fixed
    vocab_size: int | None = None  # None: taken from the prepared data's manifest
    max_seq_len: int = 1024  # longest sequence the model is meant for (RoPE has no table)
    rope_theta: float = 10000.0  # RoPE base
    # RoPE context extension, as transformers' `rope_parameters` without rope_theta, e.g. {rope_type: yarn,
    # factor: 8, original_max_position_embeddings: 1024}; types and keys in ROPE_SCALING. None: plain RoPE
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the LM head
    init_std: float = 0.02  # std of input projections; output projections get std / sqrt(2L)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count, computed from the shapes (so it also holds for a ZeRO-3 sharded model)."""
        D, F, L, V = self.dim, self.ffn_dim, self.n_layers, self.vocab_size
        attention = D * (self.n_heads + 2 * self.kv_heads) * self.head_dim + self.n_heads * self.head_dim * D
        block = attention + 3 * D * F + 2 * D  # + SwiGLU + two RMSNorm gains
        head = 0 if self.tie_embeddings else V * D
        return (V * D if embeddings else 0) + L * block + D + head

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM's accounting): 2 per weight of every matmul, the LM head
        included and the embedding lookup not, plus attention scores and values, 4 * T * D per
        layer, counted without the causal half; x3 for forward + backward."""
        D, F, L, V = self.dim, self.ffn_dim, self.n_layers, self.vocab_size
        matmul = L * (D * (self.n_heads + 2 * self.kv_heads) * self.head_dim + self.n_heads * self.head_dim * D + 3 * D * F) + V * D
        forward = 2 * matmul + 4 * L * seq_len * self.n_heads * self.head_dim
        return 3.0 * forward if training else float(forward)


# RoPE scaling types the model implements, with the keys transformers' rope utils read for each (required,
# optional). The exported config.json carries them as `rope_parameters`, so transformers computes the same RoPE.
ROPE_SCALING = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
}


def rope_scaling_problem(scaling: dict | None) -> str | None:
    """What is wrong with a rope_scaling dict (None if it is fine, or None itself)."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING:
        return (f"rope_type={kind!r} is not supported; choose one of {', '.join(ROPE_SCALING)} (the scaling types "
                "this model and transformers compute alike, so the exported model gives the same logits)")
    required, optional = ROPE_SCALING[kind]
    missing, unknown = required - set(scaling), set(scaling) - required - optional - {"rope_type"}
    if missing or unknown:
        return (f"rope_type={kind} needs {', '.join(sorted(required))}"
                + (f" and takes {', '.join(sorted(optional))}" if optional else "")
                + (f"; missing {', '.join(sorted(missing))}" if missing else "")
                + (f"; unknown {', '.join(sorted(unknown))}" if unknown else ""))
    for key, value in scaling.items():
        if key in ("rope_type", "truncate"):
            if key == "truncate" and not isinstance(value, bool):
                return f"truncate={value!r} must be true or false"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            return f"{key}={value!r} must be a number > 0"
    if scaling["factor"] < 1:
        return f"factor={scaling['factor']} must be >= 1 (it stretches the context)"
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        return "high_freq_factor must be greater than low_freq_factor"
    return None


@dataclass
class TopKConfig:
    enabled: bool = True  # False: a plain Llama (the dense twin)
    k: int = 64  # entries kept per token by each TopK layer
    n_nontopk: int = 2  # the last n blocks stay dense
    act: str = "relu"  # element-wise f applied to the kept entries: relu | identity
    site: str = "residual"  # residual: the block's output hidden state; mlp: the FFN hidden (ablation)
    anneal: str = "linear"  # alpha schedule: linear (paper) | cosine | exponential | step
    anneal_ratio: float = 0.2  # alpha reaches 0 after this fraction of the optimizer steps

    def width(self, model: ModelConfig) -> int:
        """Entries of one layer's site, i.e. neurons per layer: D at the residual stream, the FFN width at mlp."""
        return model.ffn_dim if self.site == "mlp" else model.dim

    def is_topk_layer(self, layer: int, n_layers: int) -> bool:
        return self.enabled and layer < n_layers - self.n_nontopk
