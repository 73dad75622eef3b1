"""The TopK Llama as a plain nn.Module (no DeepSpeed, no analysis), and its Hugging Face wrapper."""

from .args import ModelConfig, TopKConfig
from .llama import Transformer
from .topk import TopK, alpha, topk_activation

__all__ = ["ModelConfig", "TopKConfig", "Transformer", "TopK", "alpha", "topk_activation"]
