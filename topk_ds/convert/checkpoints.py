"""Finding and reading trained weights, wherever they are: a run directory, its checkpoints/
directory, one DeepSpeed tag (ZeRO-0...3), a converted Hugging Face directory, or a single
torch/safetensors state dict. ZeRO shards are consolidated by DeepSpeed's own zero_to_fp32."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, load_config
from ..errors import UserError
from ..model.topk import alpha as alpha_at
from ..train.checkpoint import latest_complete, problem, saved_weights, tags_by_step

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class Source:
    kind: str  # "hf" | "deepspeed" | "state_dict"
    path: Path  # the HF directory, the tag directory, or the state-dict file
    config_path: Path | None  # the run's config.yaml (None for "hf")
    step: int | None  # optimizer step the weights come from, when known


def is_hf_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "topk_llama"
    except (OSError, ValueError):
        return False


def _tag_dir(ckpt_dir: Path, tag: str | None) -> Path:
    tags = tags_by_step(ckpt_dir)
    if not tags:
        raise UserError(f"{ckpt_dir} holds no checkpoint (no global_stepN directories)")
    if tag is not None:
        path = ckpt_dir / tag
        if not path.is_dir():
            raise UserError(f"no checkpoint tag '{tag}' in {ckpt_dir}; available: {', '.join(p.name for _, p in tags)}")
        return path
    found = latest_complete(ckpt_dir, log=lambda message: print(f"topk-ds: {message}", file=sys.stderr))
    if found is None:
        raise UserError(f"no usable checkpoint in {ckpt_dir}: every tag there is incomplete or damaged")
    return found


def locate(path: Path, tag: str | None = None, config: str | None = None) -> Source:
    """What kind of weights `path` holds, and where their config is."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix not in STATE_DICT_SUFFIXES:
            raise UserError(f"{path} is not a state dict (expected one of {', '.join(STATE_DICT_SUFFIXES)})")
        config_path = Path(config) if config else path.parent / "config.yaml"
        if not config and not config_path.exists():
            raise UserError(f"{path}: a bare state dict needs its run config: pass --config (preset or YAML)")
        return Source("state_dict", path, config_path, None)
    if is_hf_dir(path):
        return Source("hf", path, None, json.loads((path / "config.json").read_text()).get("train_step"))
    if (path / "checkpoints").is_dir():
        tag_dir = _tag_dir(path / "checkpoints", tag)
    elif tags_by_step(path):
        tag_dir = _tag_dir(path, tag)
    elif list(path.glob("*model_states.pt")):
        tag_dir = path
    else:
        raise UserError(f"{path} is not a checkpoint: expected a run directory, a checkpoints/ directory, a "
                        "global_stepN tag, a converted model directory, or a .pt/.safetensors state dict")
    if (reason := problem(tag_dir)) is not None:
        raise UserError(f"checkpoint {tag_dir} is not usable: {reason}")
    config_path = Path(config) if config else tag_dir.parent.parent / "config.yaml"
    step = int(tag_dir.name.removeprefix("global_step")) if tag_dir.name.startswith("global_step") else None
    return Source("deepspeed", tag_dir, config_path, step)


def run_config(source: Source) -> Config:
    if source.config_path is None or not (source.config_path.exists() or source.config_path.suffix == ""):
        raise UserError(f"cannot find the run config for {source.path} (looked for {source.config_path}); pass --config")
    cfg = load_config(str(source.config_path))
    if cfg.model.vocab_size is None:
        raise UserError(f"{source.config_path} has no model.vocab_size (the trainer writes the resolved config)")
    return cfg


def read_weights(source: Source) -> dict:
    """The state dict with the training model's own keys (no `module.` or `model.` prefix), lazily: every value
    has `.shape`, and `.contiguous()` makes it a tensor (in the dtype it was saved in). Files are memory-mapped
    and ZeRO-3 shards consolidated one tensor at a time (DeepSpeed's lazy mode), so a caller that casts each
    tensor as it takes it never holds a second copy of the model."""
    if source.kind == "state_dict":
        try:
            if source.path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(source.path)
            else:
                state = torch.load(source.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # any unreadable file: truncated, not a state dict, ...
            raise UserError(f"cannot read state dict {source.path}: {str(e).splitlines()[0]}") from None
        state = state.get("module", state)
    else:
        state = saved_weights(source.path)
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}


def alpha_for(cfg: Config, step: int | None) -> float:
    """The alpha the weights were trained at: a pure function of the step (0 when unknown: a finished run)."""
    if step is None or not cfg.topk.enabled:
        return 0.0
    return alpha_at(step, cfg.train.steps, cfg.topk.anneal_ratio, cfg.topk.anneal)
