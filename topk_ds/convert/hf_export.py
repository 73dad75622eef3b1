"""Training weights -> one Hugging Face model directory, and the one loading function that analysis,
evaluation and steering use for either kind of input."""

import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_output, check_replaceable
from .checkpoints import Source, alpha_for, is_hf_dir, locate, read_weights, run_config

# The paper's sampling settings (Section 4).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_new_tokens": 128}


def hf_key(key: str) -> str:
    """The key map: the HF model holds the training Transformer as `.model`, so every key of the
    training state dict gains one prefix and nothing else changes (parity by construction)."""
    return f"model.{key}"


def build_hf_model(source: Source, alpha: float | None = None, device="cpu", dtype=torch.float32):
    """A TopKLlamaForCausalLM with the weights of `source` (not an HF directory) on `device` in `dtype`, eval
    mode. Built on the meta device and filled one tensor at a time, each cast and placed as it is read, so
    the weights are never held twice."""
    from transformers.initialization import no_init_weights

    from ..model.hf import TopKLlamaConfig, TopKLlamaForCausalLM

    cfg = run_config(source)
    weights = read_weights(source)
    config = TopKLlamaConfig.from_args(cfg.model, cfg.topk, train_step=source.step,
                                       topk_alpha=alpha_for(cfg, source.step) if alpha is None else alpha)
    with torch.device("meta"), no_init_weights():  # every weight is assigned from the checkpoint below
        model = TopKLlamaForCausalLM(config)
    if cfg.model.tie_embeddings:
        weights.pop("output.weight", None)
    expected = {k: tuple(p.shape) for k, p in model.state_dict().items()
                if not (cfg.model.tie_embeddings and k == "model.output.weight")}
    got = {hf_key(k): tuple(v.shape) for k, v in weights.items()}
    if got.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - got.keys())[:3], sorted(got.keys() - expected.keys())[:3]
        raise UserError(f"the config does not match the weights of {source.path}: missing {missing}, unexpected {extra}")
    for k, shape in expected.items():
        if got[k] != shape:
            raise UserError(f"the config does not match the weights of {source.path}: {k} is {got[k]} in the "
                            f"checkpoint and {shape} in the config")
    state = {}
    for k in list(weights):  # one tensor at a time: read (consolidated), cast, placed; the source let go
        state[hf_key(k)] = weights.pop(k).contiguous().to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.model.tie_embeddings:
        model.model.output.weight = model.model.tok_embeddings.weight
    return model.eval(), cfg


def tokenizer_source(cfg, override: str | None) -> Path:
    path = Path(override) if override else Path(cfg.data.path) / "tokenizer"
    if not (path / "tokenizer_config.json").exists():
        raise UserError(f"no tokenizer at {path} (the run's data.path/tokenizer); pass --tokenizer DIR")
    return path


def convert(ckpt: Path, out: Path | None = None, *, tag: str | None = None, dtype: str = "fp32",
            force: bool = False, tokenizer: str | None = None, config: str | None = None) -> Path:
    from transformers import GenerationConfig
    from transformers.utils import logging as transformers_logging

    source = locate(ckpt, tag, config)
    if source.kind == "hf":
        raise UserError(f"{ckpt} is already a converted model directory")
    out = Path(out) if out else source.path.parent.parent / "hf" / source.path.name if source.kind == "deepspeed" \
        else source.path.with_suffix("")
    check_replaceable(out, "config.json", "convert")  # --force replaces a model directory, nothing else
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    model, cfg = build_hf_model(source)
    tok_dir = tokenizer_source(cfg, tokenizer)
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model.config.bos_token_id, model.config.eos_token_id = _special_ids(tok_dir)
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id,
                                               eos_token_id=model.config.eos_token_id, **GENERATION_DEFAULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    transformers_logging.disable_progress_bar()  # a bar for writing one file
    with atomic_output(out) as tmp:
        model.config.register_for_auto_class()
        model.register_for_auto_class("AutoModelForCausalLM")
        model.save_pretrained(tmp)
        for f in tok_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return out


def _special_ids(tok_dir: Path) -> tuple[int | None, int | None]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    return tok.bos_token_id, tok.eos_token_id


def load(path, *, tag: str | None = None, alpha: float | None = None, config: str | None = None, device="cpu",
         dtype=None):
    """Load any trained weights as (TopKLlamaForCausalLM in eval mode, tokenizer or None).

    `path` is a converted directory or a training checkpoint (run directory, checkpoints/ or one
    tag). The model runs at the alpha recorded for its step unless `alpha` is given (analysis of a
    finished run uses 0, which is also what a finished run records). `device`: cpu (default), auto,
    cuda, cuda:N or a torch.device; `dtype`: fp32, bf16 or a torch.dtype (default: bf16 on a GPU, fp32 on
    the CPU), see topk_ds.devices.resolve.
    """
    from transformers import AutoTokenizer

    from ..devices import resolve
    from ..model.hf import TopKLlamaForCausalLM

    device, dtype = resolve(device, dtype)
    path = Path(path)
    if is_hf_dir(path):
        try:
            model = TopKLlamaForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as e:  # missing, truncated or foreign weights: transformers and safetensors raise many types
            raise UserError(f"cannot load the model in {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        model = model.to(device).eval()
        if alpha is not None:
            model.model.set_alpha(alpha)
        tok_dir = path
    else:
        model, cfg = build_hf_model(locate(path, tag, config), alpha, device, dtype)
        tok_dir = Path(cfg.data.path) / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tok_dir) if (tok_dir / "tokenizer_config.json").exists() else None
    return model, tokenizer


def read_config(path, tag: str | None = None, config: str | None = None):
    """(ModelConfig, TopKConfig) of what `load(path, tag=..., config=...)` would load, without reading weights."""
    from ..model.hf import TopKLlamaConfig

    path = Path(path)
    if is_hf_dir(path):
        return TopKLlamaConfig.from_pretrained(path).to_args()
    cfg = run_config(locate(path, tag, config))
    return cfg.model, cfg.topk


def run_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of one run, oldest first (to trace neurons over training)."""
    from ..train.checkpoint import problem, tags_by_step

    ckpt_dir = Path(run_dir) / "checkpoints"
    found = [(step, p) for step, p in reversed(tags_by_step(ckpt_dir)) if problem(p) is None]
    if not found:
        raise UserError(f"{run_dir} has no complete checkpoints in {ckpt_dir}")
    return found
