"""One dataclass tree for a run: model, topk, data, train.

Precedence, lowest first: dataclass defaults < preset < YAML file < `--set a.b=c` overrides.
A YAML file may start from a preset with `preset: NAME`. Unknown keys are rejected with the list of
valid ones, and `validate()` checks every field up front, naming the field and its allowed range.
Values the paper text lost are our defaults and say so.
"""

import copy
import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .errors import UserError
from .io import write_text
from .model.args import ModelConfig, TopKConfig, rope_scaling_problem
from .model.topk import ACTIVATIONS, SCHEDULES


@dataclass
class DataConfig:
    path: str = ""  # prepared token shards (`topk-ds data prepare --out`)
    seq_len: int = 1024  # tokens per training sequence (the paper: 1024)
    seed: int = 0  # seed of the shuffled sample order


@dataclass
class TrainConfig:
    out_dir: str = "runs/topk"  # the run directory: configs, checkpoints/, metrics.jsonl, logs
    steps: int = 40000  # optimizer steps (~20B tokens at the default batch)
    micro_batch: int = 16  # sequences per rank per micro-step
    # micro-steps per optimizer step; global batch = micro x accum x ranks: 512 x 1024 tokens on 8 GPUs
    # (our default: the paper's batch size was lost)
    grad_accum: int = 4
    lr: float = 3e-4  # peak learning rate (our default: the paper's value was lost)
    min_lr_ratio: float = 0.1  # cosine decays to lr x this (our default)
    warmup_ratio: float = 0.01  # linear warmup over this fraction of the steps (our default)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (Lingua/Llama values)
    weight_decay: float = 0.1  # AdamW, not applied to norms and embeddings (Lingua/Llama value)
    grad_clip: float = 1.0  # max global gradient norm (Lingua/Llama value)
    precision: str = "bf16"  # bf16 | fp32 (fp32 on CPU: bf16 matmuls there are ~25x slower)
    ds_config: str = "ds_configs/zero3_bf16.json"  # DeepSpeed engine knobs (ZeRO stage, offload, ...)
    activation_checkpointing: bool = False  # recompute each block in backward (wide D ablations)
    # ranks that share each sequence (DeepSpeed-Ulysses: each runs seq_len / N positions, attention all-to-alls
    # heads); data-parallel ranks = ranks / N, and the global batch counts sequences over those
    sequence_parallel: int = 1
    # start from these weights (a run, its checkpoints/ or a global_stepN tag) with a fresh optimizer, schedule and
    # data order, e.g. to continue a model at a longer context (a TopK model is sparse already: topk.anneal_ratio=0);
    # a resumed run keeps its own weights
    init_from: str = ""
    compile: bool = False  # torch.compile each block; off until a GPU measurement shows that it pays
    # deterministic kernels only (torch.use_deterministic_algorithms, cuBLAS's fixed workspace), so a GPU run
    # repeats bit for bit, as a CPU run does anyway; slower on a GPU, and an op without such a kernel stops the run
    deterministic: bool = False
    save_every: int = 1000  # checkpoint every N optimizer steps (and at the end)
    keep_last: int = 3  # checkpoints kept; older ones are deleted
    eval_every: int = 500  # validation loss every N steps; 0 turns it off
    eval_batches: int = 20  # micro-batches per rank per validation
    log_every: int = 10  # a progress line every N steps when stderr is not a terminal (SLURM logs, nohup)
    health_window: int = 100  # steps over which "never fired" is measured for TopK layers
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    seed: int = 0  # model init and any randomness of the run
    wandb: str = "offline"  # offline | online | disabled (offline needs no network and no key)
    wandb_project: str = "topk_ds"
    tensorboard: bool = True  # DeepSpeed's tensorboard monitor, into out_dir/tensorboard
    csv: bool = False  # DeepSpeed's csv monitor, into out_dir/csv


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    topk: TopKConfig = field(default_factory=TopKConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "Config":
        validate(self)
        return self


def _paper(dim: int, layers: int, ffn_dim: int) -> dict:
    return {
        "model": {"dim": dim, "n_layers": layers, "n_heads": 16, "ffn_dim": ffn_dim, "max_seq_len": 1024},
        "topk": {"k": 64, "n_nontopk": 2},
        "data": {"seq_len": 1024},
        "train": {"out_dir": f"runs/paper-{dim}x{layers}"},
    }


def _cpu(dim: int, ffn_dim: int, k: int, seq_len: int, **train) -> dict:
    """A 4-layer model trained in fp32 on CPU ranks (ds_configs/cpu.json), without tensorboard or wandb."""
    return {
        "model": {"dim": dim, "n_layers": 4, "n_heads": 4, "ffn_dim": ffn_dim, "max_seq_len": 256},
        "topk": {"k": k, "n_nontopk": 2},
        "data": {"seq_len": seq_len},
        "train": {"micro_batch": 8, "grad_accum": 1, "warmup_ratio": 0.05, "precision": "fp32",
                  "ds_config": "ds_configs/cpu.json", "eval_batches": 4, "wandb": "disabled", "tensorboard": False,
                  **train},
    }


# Named starting points. Every preset has a dense twin, NAME-dense, with topk.enabled=false.
_PRESETS = {
    # The test model: seconds per run on one CPU core.
    "tiny": _cpu(64, 128, 8, 64, out_dir="runs/tiny", steps=200, lr=3e-3, save_every=100, eval_every=50,
                 health_window=20),
    # The demo (`topk-ds demo`): minutes on a 2-core CPU with 2 ranks (global batch 16 x 128 tokens).
    "demo": _cpu(128, 256, 16, 128, out_dir="runs/demo", steps=800, lr=2e-3, save_every=200, keep_last=4,
                 eval_every=200, health_window=50),
    # The paper's configurations (D x L); ffn_dim is the Llama rule for D=1024 / 2048, kept fixed
    # when widening D (set it explicitly for the width ablations).
    "paper-1024x8": _paper(1024, 8, 2816),
    "paper-2048x24": _paper(2048, 24, 5632),
    # Long context (README "Long context"): paper-1024x8, trained at 1k on `corpus synth --long` data, continued at
    # 8k on one node of 8 GPUs, each sequence split over all 8 (Ulysses: 1k positions and 2 of the 16 heads per GPU,
    # so a GPU holds the activations of the 1k run at micro-batch 8), RoPE stretched 8x by YaRN; set
    # train.init_from to the 1k run. Global batch 64 x 8192 tokens (the 1k run's 524,288 per step), ~1B tokens;
    # peak LR, warmup and step count are our defaults.
    "long": {
        "model": {**_paper(1024, 8, 2816)["model"], "max_seq_len": 8192,
                  "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024}},
        "topk": {"k": 64, "n_nontopk": 2, "anneal_ratio": 0.0},  # continued from a finished (sparse) TopK run
        "data": {"seq_len": 8192},
        "train": {"out_dir": "runs/long-1024x8", "sequence_parallel": 8, "micro_batch": 8, "grad_accum": 8,
                  "steps": 2000, "lr": 1e-4, "warmup_ratio": 0.05, "save_every": 250, "eval_every": 250},
    },
}
PRESETS = {**_PRESETS, **{f"{name}-dense": {**p, "topk": {**p["topk"], "enabled": False}} for name, p in _PRESETS.items()}}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value, hint, where: str):
    """Check/convert one value against a field's annotated type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is dict:  # a mapping of plain values (model.rope_scaling), set as a whole
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping like {{key: value, ...}}, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            value = float(value) if hint is float or not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            pass
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or int(value) != value:
            raise UserError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint} at {where}")


def _merge(obj, updates: dict, where: str) -> None:
    """Apply a nested dict onto a dataclass instance, in place."""
    if not isinstance(updates, dict):
        raise UserError(f"{where or 'config'} must be a mapping, got {updates!r}")
    hints = _hints(type(obj))
    for key, value in updates.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            valid = ", ".join(sorted(hints))
            raise UserError(f"unknown config key '{path}'; valid keys{' of ' + where if where else ''}: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, path)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; available: {', '.join(PRESETS)}")
    cfg = Config()
    _merge(cfg, copy.deepcopy(PRESETS[name]), "")
    return cfg


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C parser: 10x faster
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config {path} is not a YAML text file (byte 0x{e.object[e.start]:02x} at {e.start} is not "
                        f"UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config {path} is not valid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}"
                        f"{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of sections (model, topk, data, train)")
    return data


def parse_override(text: str) -> tuple[list[str], object]:
    """'model.dim=2048' -> (['model', 'dim'], 2048); the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like section.field=value (e.g. model.dim=2048)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(source: str | None = None, overrides: list[str] = ()) -> Config:
    """A preset name or a YAML path, then `--set` overrides; validated."""
    cfg = Config()
    if source:
        if source in PRESETS:
            cfg = preset(source)
        elif Path(source).suffix in (".yaml", ".yml", ".json") or Path(source).exists():
            data = _read_yaml(Path(source))
            base = data.pop("preset", None)
            if base is not None:
                cfg = preset(str(base))
            _merge(cfg, data, "")
        else:
            raise UserError(f"--config '{source}' is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    for text in overrides:
        keys, value = parse_override(text)
        nested = value
        for key in reversed(keys):
            nested = {key: nested}
        _merge(cfg, nested, "")
    return cfg.validate()


def save_config(cfg: Config, path: Path) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# What a resume may change: how long the run goes on, its cadences, logging and monitoring, and the batch
# layout (micro_batch x grad_accum x ranks must keep the global batch: the trainer checks it against the
# checkpoint). Everything else, the model and TopK sections above all, is fixed when a run starts.
# train.init_from only says where a run's first weights came from; compile and sequence_parallel are layout
RESUMABLE = {"train.out_dir", "train.steps", "train.micro_batch", "train.grad_accum", "train.activation_checkpointing",
             "train.sequence_parallel", "train.compile", "train.deterministic", "train.init_from",
             "train.save_every", "train.keep_last", "train.eval_every", "train.eval_batches", "train.log_every",
             "train.health_window", "train.max_bad_steps", "train.wandb", "train.wandb_project", "train.tensorboard",
             "train.csv"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def resume_changes(saved: Config, new: Config) -> list[str]:
    """The fields a resume may not change that `new` changes, as 'field: old -> new'."""
    old, now = _flat(saved.to_dict()), _flat(new.to_dict())
    return [f"{key}: {old.get(key)!r} -> {now.get(key)!r}" for key in sorted(old.keys() | now.keys())
            if key not in RESUMABLE and old.get(key) != now.get(key)]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: Config) -> None:
    m, t, d, tr = cfg.model, cfg.topk, cfg.data, cfg.train
    for name in ("dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
        _check(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)} must be >= 1")
    _check(m.dim % m.n_heads == 0, f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}")
    _check(m.head_dim % 2 == 0, f"model.dim / model.n_heads = {m.head_dim} must be even (RoPE rotates pairs)")
    if m.n_kv_heads is not None:
        _check(1 <= m.n_kv_heads <= m.n_heads and m.n_heads % m.n_kv_heads == 0,
               f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    _check(m.vocab_size is None or m.vocab_size >= 2, f"model.vocab_size={m.vocab_size} must be >= 2 (or null: from the data)")
    _check(m.norm_eps > 0 and m.rope_theta > 0 and m.init_std > 0, "model.norm_eps, model.rope_theta and model.init_std must be > 0")
    _check((problem := rope_scaling_problem(m.rope_scaling)) is None, f"model.rope_scaling: {problem}")

    _check(t.site in ("residual", "mlp"), f"topk.site='{t.site}' must be one of: residual, mlp")
    width = t.width(m)
    _check(1 <= t.k <= width, f"topk.k={t.k} exceeds {'model.dim' if t.site == 'residual' else 'model.ffn_dim'}={width}; choose 1 <= k <= {width}")
    _check(0 <= t.n_nontopk <= m.n_layers, f"topk.n_nontopk={t.n_nontopk} must be in [0, model.n_layers={m.n_layers}]")
    _check(t.act in ACTIVATIONS, f"topk.act='{t.act}' must be one of: {', '.join(ACTIVATIONS)}")
    _check(t.anneal in SCHEDULES, f"topk.anneal='{t.anneal}' must be one of: {', '.join(SCHEDULES)}")
    _check(0.0 <= t.anneal_ratio <= 1.0, f"topk.anneal_ratio={t.anneal_ratio} must be in [0, 1]")

    _check(1 <= d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} must be in [1, model.max_seq_len={m.max_seq_len}]")

    for name in ("steps", "micro_batch", "grad_accum", "save_every", "keep_last", "eval_batches", "log_every", "health_window",
                 "max_bad_steps"):
        _check(getattr(tr, name) >= 1, f"train.{name}={getattr(tr, name)} must be >= 1")
    sp = tr.sequence_parallel
    _check(sp >= 1, f"train.sequence_parallel={sp} must be >= 1")
    for what, n in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads), ("data.seq_len", d.seq_len)):
        _check(n % sp == 0, f"train.sequence_parallel={sp} must divide {what}={n} (each of the {sp} ranks of a "
                            "sequence gets an equal share of the positions and of the attention heads)")
    _check(tr.eval_every >= 0, f"train.eval_every={tr.eval_every} must be >= 0 (0: no validation)")
    _check(tr.lr > 0, f"train.lr={tr.lr} must be > 0")
    _check(0.0 <= tr.min_lr_ratio <= 1.0, f"train.min_lr_ratio={tr.min_lr_ratio} must be in [0, 1]")
    _check(0.0 <= tr.warmup_ratio < 1.0, f"train.warmup_ratio={tr.warmup_ratio} must be in [0, 1)")
    _check(len(tr.betas) == 2 and all(0.0 <= b < 1.0 for b in tr.betas), f"train.betas={tr.betas} must be two numbers in [0, 1)")
    _check(tr.weight_decay >= 0 and tr.grad_clip >= 0, "train.weight_decay and train.grad_clip must be >= 0")
    _check(tr.precision in ("bf16", "fp32"), f"train.precision='{tr.precision}' must be one of: bf16, fp32")
    _check(tr.wandb in ("offline", "online", "disabled"), f"train.wandb='{tr.wandb}' must be one of: offline, online, disabled")
