"""topk_ds: DeepSpeed-based scale-out training of TopK language models, with conversion to
Hugging Face, evaluation through lm-eval, and the interpretability toolkit."""

__version__ = "0.1.0"
