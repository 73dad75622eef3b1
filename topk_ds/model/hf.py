"""The TopK Llama as a Hugging Face model: config, `generate()` with KV cache, Auto-class registration.

This file is copied, with the rest of `topk_ds/model/`, into every exported model directory, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a process that has
never seen topk_ds; it must import only torch, transformers and its siblings (relatively).
Importing it registers the classes with the Auto classes, so in a process that has imported it no
remote code is needed at all.
"""

from dataclasses import fields

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .args import ModelConfig, TopKConfig, rope_scaling_problem
from .llama import Transformer
from .topk import TopK

# The output's cache field: `cache` from transformers 5.24 on, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"

M, K = ModelConfig, TopKConfig  # field defaults come from the dataclasses: one source of truth
_RENAMED = ("tie_embeddings", "rope_theta", "rope_scaling")  # ModelConfig fields stored under transformers' names


class TopKLlamaConfig(PreTrainedConfig):
    """ModelConfig's fields by name (tie_embeddings as HF's tie_word_embeddings; rope_theta and rope_scaling
    as transformers' `rope_parameters`, which Llama configs and every RoPE tool read), TopKConfig's with a
    `topk_` prefix, the alpha the weights were trained at, and the optimizer step they come from."""

    model_type = "topk_llama"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_dim",
                     "max_position_embeddings": "max_seq_len"}

    dim: int = M.dim
    n_layers: int = M.n_layers
    n_heads: int = M.n_heads
    n_kv_heads: int | None = M.n_kv_heads
    ffn_dim: int = M.ffn_dim
    vocab_size: int = 32000
    max_seq_len: int = M.max_seq_len
    rope_parameters: dict | None = None  # {"rope_type": "default" | a ROPE_SCALING type, "rope_theta": ..., ...}
    norm_eps: float = M.norm_eps
    init_std: float = M.init_std
    tie_word_embeddings: bool = M.tie_embeddings
    topk_enabled: bool = K.enabled
    topk_k: int = K.k
    topk_n_nontopk: int = K.n_nontopk
    topk_act: str = K.act
    topk_site: str = K.site
    topk_anneal: str = K.anneal
    topk_anneal_ratio: float = K.anneal_ratio
    topk_alpha: float = 0.0  # alpha of the step the weights come from (0 once annealing is over)
    train_step: int | None = None  # optimizer step of the training checkpoint
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    use_cache: bool = True

    @classmethod
    def from_args(cls, model: ModelConfig, topk: TopKConfig, **extra) -> "TopKLlamaConfig":
        if problem := rope_scaling_problem(model.rope_scaling):
            raise ValueError(f"cannot export model.rope_scaling: {problem}")
        values = {f.name: getattr(model, f.name) for f in fields(model) if f.name not in _RENAMED}
        values |= {f"topk_{f.name}": getattr(topk, f.name) for f in fields(topk)}
        rope = {"rope_type": "default", "rope_theta": model.rope_theta} | (model.rope_scaling or {})
        return cls(tie_word_embeddings=model.tie_embeddings, rope_parameters=rope, **values, **extra)

    def to_args(self) -> tuple[ModelConfig, TopKConfig]:
        rope = dict(self.rope_parameters)
        theta = rope.pop("rope_theta")
        if rope["rope_type"] != "default" and (problem := rope_scaling_problem(rope)):
            raise ValueError(f"rope_parameters of this TopK LM: {problem}")
        model = ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig) if f.name not in _RENAMED},
                            tie_embeddings=self.tie_word_embeddings, rope_theta=theta,
                            rope_scaling=None if rope["rope_type"] == "default" else rope)
        return model, TopKConfig(**{f.name: getattr(self, f"topk_{f.name}") for f in fields(TopKConfig)})


class TopKLlamaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TopKLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}  # only if tie_word_embeddings

    def __init__(self, config: TopKLlamaConfig):
        super().__init__(config)
        self.model = Transformer(*config.to_args())
        self.model.set_alpha(config.topk_alpha)
        self.post_init()

    def _init_weights(self, module):
        # Transformer initialises itself and from_pretrained loads every weight; what it cannot load
        # is alpha's buffer (not saved: alpha is in the config), which it leaves uninitialised.
        if isinstance(module, TopK):
            module.alpha = self.config.topk_alpha

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.model.output

    def forward(self, input_ids: torch.LongTensor, attention_mask=None, cache=None, use_cache=None, labels=None,
                logits_to_keep: int = 0, past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("TopK LM: padded batches are not supported (attention_mask has zeros); "
                             "run prompts of different lengths one at a time")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("TopK LM: inputs_embeds is not supported; pass input_ids")
        cache = past_key_values if cache is None else cache  # transformers < 5.24 calls it past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        logits = self.model(input_ids, cache=cache if use_cache else None)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


AutoConfig.register(TopKLlamaConfig.model_type, TopKLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(TopKLlamaConfig, TopKLlamaForCausalLM, exist_ok=True)
