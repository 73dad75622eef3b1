"""topk_ds: DeepSpeed-based scale-out training of TopK language models, with conversion to
Hugging Face, evaluation through lm-eval, and the interpretability toolkit.

`topk_ds.load(path)` opens a converted model or a training checkpoint as (model, tokenizer);
it imports transformers on first use (and registers the model with the Auto classes), so that
`import topk_ds` and the command line stay fast.
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    from .convert.hf_export import load as _load

    return _load(path, **kwargs)
