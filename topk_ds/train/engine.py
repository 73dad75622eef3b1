"""The one seam to DeepSpeed: the resolved DeepSpeed config, the model built sharded under
zero.Init, the engine, the annealing hook, and the micro-step / eval / checkpoint calls the loop uses.

The DeepSpeed JSON holds engine knobs only (ZeRO stage, offload, buckets, ...). Batch sizes,
optimizer, LR schedule, clipping, precision and monitors come from our config and are filled in
here; a JSON that sets one of them differently is an error, so there is one source of truth.
"""

import difflib
import json
import math
import os
import types
from collections.abc import KeysView
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.zero.utils import ZeRORuntimeException
from pydantic import ValidationError

from ..config import Config
from ..errors import UserError
from ..model import Transformer
from ..model.llama import causal_attention, no_gather
from ..model.topk import alpha as alpha_at
from .distributed import SharedError, close_process_group

REPO_ROOT = Path(__file__).resolve().parents[2]
_OURS = {"optimizer": "train.lr/betas/weight_decay", "scheduler": "train.lr/warmup_ratio/min_lr_ratio",
         "gradient_clipping": "train.grad_clip", "fp16": "train.precision", "tensorboard": "train.tensorboard",
         "wandb": "train.wandb", "csv_monitor": "train.csv"}


def init_distributed() -> None:
    deepspeed.init_distributed(dist_init_required=None)


def shutdown_distributed() -> None:
    """Close the process group whatever ended the run: left to the interpreter's exit, gloo's threads now and
    then abort the process ("terminate called without an active exception"). DeepSpeed keeps groups made
    in the closed one (its clone of the world group, a sequence-parallel mpu); they are forgotten, so a later
    run in the same process (a notebook, the tests) makes its own."""
    close_process_group()
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.utils import groups

    groups._WORLD_GROUP, groups.mpu = None, None
    parallel_state_sp._release_sequence_parallel_groups()


def sequence_parallel_state(n: int):
    """DeepSpeed's own sequence-parallel groups (parallel_state_sp, the `mpu` of its Ulysses integration):
    ranks [i*n, (i+1)*n) share sequences; ZeRO partitions and reduces gradients over all ranks, averaging
    over ranks / n. That module answers tensor-parallel questions with the sequence-parallel group, so
    DeepSpeed 0.19.8 would record "tensor-parallel degree n" in checkpoints (ds_to_universal then looks for
    n model files) and read a universal checkpoint as n tensor slices; Ulysses shards no weight, so this
    unit says there is no tensor parallelism."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(n)
    unit = {name: getattr(parallel_state_sp, name) for name in dir(parallel_state_sp) if name.startswith(("get_", "init"))}
    return types.SimpleNamespace(**unit, get_tensor_model_parallel_world_size=lambda: 1,
                                 get_tensor_model_parallel_rank=lambda: 0)


def ulysses_attention(group):
    """The model's attention contract (q, k, v: (B, heads, T, head_dim), T this rank's slice) over a sequence
    split across `group`, by DeepSpeed-Ulysses: DistributedAttention all-to-alls q, k and v from all heads of
    T positions to heads / N of all N * T positions, runs causal attention there, and all-to-alls back."""
    from deepspeed.sequence.layer import DistributedAttention

    def local(q, k, v):  # (B, N * T, heads / N, head_dim) from DistributedAttention
        return causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    distributed = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)

    def attend(q, k, v):
        return distributed(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), batch_dim_idx=0).transpose(1, 2)

    return attend


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def find_ds_config(name: str) -> Path:
    """As given, else relative to the repository (so `ds_configs/cpu.json` works from anywhere)."""
    for path in (Path(name), REPO_ROOT / name):
        if path.is_file():
            return path
    raise UserError(f"train.ds_config: no such DeepSpeed config '{name}'")


def resolve_ds_config(cfg: Config, world_size: int, run_dir: Path | None = None, universal: bool = False) -> dict:
    path = find_ds_config(cfg.train.ds_config)
    try:
        ds = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise UserError(f"{path} must hold a JSON object of DeepSpeed settings, not a {type(ds).__name__}")
    tr = cfg.train
    for key, ours in _OURS.items():
        if key in ds:
            raise UserError(f"{path}: '{key}' comes from our config ({ours}); remove it from the DeepSpeed JSON")
    batch = {"train_micro_batch_size_per_gpu": tr.micro_batch, "gradient_accumulation_steps": tr.grad_accum,
             "train_batch_size": tr.micro_batch * tr.grad_accum * world_size}
    for key, value in batch.items():
        if key in ds and ds[key] != value:
            raise UserError(
                f"{path}: {key}={ds[key]} disagrees with train.micro_batch={tr.micro_batch} x "
                f"train.grad_accum={tr.grad_accum} x {world_size} ranks (train_batch_size must be "
                f"{batch['train_batch_size']}); fix one or drop the key from the JSON")
    bf16 = ds.get("bf16", {})
    if "enabled" in bf16 and bf16["enabled"] != (tr.precision == "bf16"):
        raise UserError(f"{path}: bf16.enabled={bf16['enabled']} disagrees with train.precision={tr.precision}")
    ds |= batch
    ds["bf16"] = bf16 | {"enabled": tr.precision == "bf16"}
    ds["gradient_clipping"] = tr.grad_clip
    ds["optimizer"] = adamw(cfg, ds, get_accelerator().device_name())
    # WarmupCosineLR gives iteration i the ratio min + (1 - min) * i / warmup_num_steps. Starting at min = 1/W
    # over W - 1 iterations, and stepped once before training (Engine), step s (from 1) runs at s / W of the
    # peak: no update is wasted at lr 0 (with min = 0, DeepSpeed's own start, steps 1 and 2 both were).
    warmup = max(1, round(tr.warmup_ratio * tr.steps))
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
        "total_num_steps": tr.steps, "warmup_min_ratio": 1 / warmup, "warmup_type": "linear",
        "warmup_num_steps": max(1, warmup - 1), "cos_min_ratio": tr.min_lr_ratio}}
    ds.setdefault("steps_per_print", 10**9)  # we report every step ourselves
    if run_dir is not None:
        ds["tensorboard"] = {"enabled": tr.tensorboard, "output_path": str(run_dir / "tensorboard"), "job_name": "train"}
        ds["csv_monitor"] = {"enabled": tr.csv, "output_path": str(run_dir / "csv"), "job_name": "train"}
        ds["wandb"] = {"enabled": tr.wandb != "disabled", "project": tr.wandb_project}
    if universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    if tr.sequence_parallel > 1 and not ds.get("zero_optimization", {}).get("stage", 0):
        raise UserError(f"{path}: train.sequence_parallel needs ZeRO stage 1, 2 or 3 (without ZeRO, DeepSpeed 0.19.8 "
                        "reduces the gradient norm over the sequence-parallel group)")
    validate_ds_config(ds, path)
    return ds


def load_weights(model: Transformer, weights: dict, gather) -> None:
    """Copy saved weights (train.init_from; lazy values, DeepSpeed's keys) into the model, one parameter at a time
    made whole by `gather` (ZeRO-3)."""
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    params = dict(model.named_parameters())  # a tied head is the embedding: one parameter
    missing, unexpected = set(params) - set(weights), set(weights) - set(model.state_dict())
    if missing or unexpected:
        raise UserError(f"train.init_from: the weights do not fit this model: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    for name, param in params.items():
        with gather([param]), torch.no_grad():
            value = weights[name].contiguous()
            if value.shape != param.shape:
                raise UserError(f"train.init_from: {name} has shape {tuple(value.shape)} there and "
                                f"{tuple(param.shape)} in this model; keep the model's shape to continue it")
            param.copy_(value)


def fused_adam_prebuilt() -> bool:
    """Whether DeepSpeed's FusedAdam op was compiled when DeepSpeed was installed (DS_BUILD_FUSED_ADAM=1)."""
    from deepspeed.git_version_info import accelerator_name, installed_ops

    return bool(installed_ops.get("fused_adam")) and accelerator_name == get_accelerator()._name


def adamw(cfg: Config, ds: dict, device_name: str) -> dict:
    """DeepSpeed's optimizer block: AdamW with our hyper-parameters. DeepSpeed's own AdamW on a GPU is
    FusedAdam, which compiles itself with nvcc at first use, and pip-only CUDA images have no nvcc:
    so torch's AdamW with its fused kernels ("torch_adam"; DeepSpeed passes "fused" on to it) unless
    FusedAdam was built at install time. With the optimizer offloaded DeepSpeed's CPU Adam stays (a
    torch optimizer there is slow, and refused when passed as a client optimizer). CPU ranks always
    take torch's AdamW."""
    tr = cfg.train
    params = {"lr": tr.lr, "betas": tr.betas, "eps": 1e-8, "weight_decay": tr.weight_decay}
    offload = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    if device_name == "cpu" or (offload in ("none", None) and not fused_adam_prebuilt()):
        params |= {"torch_adam": True, "fused": True}
    return {"type": "AdamW", "params": params}


class _ReadKeys(dict):
    """A dict that remembers which keys were looked up, to find the ones DeepSpeed never reads."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __copy__(self):  # DeepSpeedConfig parses a copy: share the record
        copy = _ReadKeys(self)
        copy.read = self.read
        return copy

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def keys(self):  # DeepSpeed also asks `key in config.keys()`
        return _ReadKeysView(self)


class _ReadKeysView(KeysView):
    def __contains__(self, key):
        return key in self._mapping


class _OneRank:
    """An mpu for DeepSpeedConfig: a data-parallel size of one, whatever the process group (our own
    check has compared the batch sizes with the real number of ranks already)."""

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return 1


def validate_ds_config(ds: dict, path: Path) -> None:
    """DeepSpeed's own parser (DeepSpeedConfig and its pydantic models of ZeRO, bf16, ...) on the
    resolved config, before anything is written, with its errors as one line. A top-level key it
    never reads is a knob it does not know (DeepSpeed itself would silently ignore a typo)."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    one_rank = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    tracked = _ReadKeys(ds | {"train_batch_size": one_rank})
    try:
        DeepSpeedConfig(tracked, mpu=_OneRank())
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(map(str, error["loc"]))
        sections = [key for key, value in ds.items() if isinstance(value, dict) and error["loc"][0] in value]
        if len(sections) == 1:  # the pydantic model knows its fields, not the JSON key it was read from
            where = f"{sections[0]}.{where}"
        raise UserError(f"{path}: DeepSpeed {deepspeed.__version__} rejects {where}={error.get('input')!r} "
                        f"({e.title}): {error['msg']}") from None
    except (DeepSpeedConfigError, AssertionError, TypeError, ValueError) as e:
        raise UserError(f"{path}: DeepSpeed {deepspeed.__version__} rejects it: {str(e).strip().splitlines()[0]}") from None
    for key in ds:
        if key not in tracked.read:
            near = difflib.get_close_matches(key, tracked.read, n=1)
            raise UserError(f"{path}: '{key}' is not a DeepSpeed {deepspeed.__version__} setting"
                            + (f"; did you mean '{near[0]}'?" if near else ""))


def module_granularity(module: torch.nn.Module) -> float:
    """DeepSpeed's granularity of a module (runtime/zero/parameter_offload.py): its parameters //
    the modules below it, itself included, that hold parameters or are composites holding some
    (containers such as ModuleList excluded); infinite above 1e9 parameters. Under
    stage3_module_granularity_threshold, the outermost modules at or below the threshold are fetched
    as one unit."""
    counted = [m for m in module.modules() if list(m.parameters(recurse=False)) or (
        any(m.children()) and type(m).__name__ not in torch.nn.modules.container.__all__ and list(m.parameters()))]
    params = sum(p.numel() for p in module.parameters())
    return params // len(counted) if counted and params <= 1e9 else math.inf


def check_granularity(cfg: Config, ds: dict, where: str) -> None:
    """DeepSpeed 0.19.8 fails in backward when the granularity threshold makes the whole model one
    fetch unit ("output with shape [1] doesn't match the broadcast shape"): refuse that up front."""
    zero = ds.get("zero_optimization") or {}
    threshold = zero.get("stage3_module_granularity_threshold", zero.get("module_granularity_threshold", 0))
    if zero.get("stage") != 3 or not threshold:
        return
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.topk)
    whole, block = module_granularity(model), module_granularity(model.layers[0])
    if threshold >= whole:
        raise UserError(f"{where}: stage3_module_granularity_threshold={threshold:,} makes the whole model one fetch "
                        f"unit (its granularity is {whole:,}), which DeepSpeed {deepspeed.__version__} cannot train; "
                        f"choose a value below that" + (f" (from {block:,} up, each block is one unit)" if block < whole else ""))


def param_groups(model: Transformer, weight_decay: float) -> list[dict]:
    """Weight decay on projection matrices only: never on norms or the embedding (nor a tied head)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if "norm" in name or name.startswith("tok_embeddings") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class AnnealingHook:
    """A forward pre-hook on the model that sets alpha of every TopK module from the schedule at the
    engine's optimizer step. All micro-batches of a step see the same global_steps, hence one alpha;
    after a resume global_steps is restored, hence the same alpha as the uninterrupted run."""

    def __init__(self, engine, total_steps: int, ratio: float, kind: str):
        self.engine, self.total, self.ratio, self.kind = engine, total_steps, ratio, kind
        self.modules = engine.module.topk_modules()

    def alpha_of(self, step: int) -> float:
        return alpha_at(step, self.total, self.ratio, self.kind)

    def __call__(self, module, args):
        value = self.alpha_of(self.engine.global_steps)
        for m in self.modules:
            m.alpha = value


class FileCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save checkpoint engine, writing through a Python file: a failed write (a full disk, a
    file-size limit) then ends in an OSError naming the file and the cause, where torch.save to a path raises
    only "unexpected pos N vs M"."""

    def save(self, state_dict, path: str):
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
        except (OSError, RuntimeError) as e:
            cause = e if isinstance(e, OSError) else e.__context__  # torch wraps the file's error
            if not isinstance(cause, OSError) or cause.errno is None:
                raise
            raise OSError(cause.errno, cause.strerror, path) from None


class Engine:
    def __init__(self, cfg: Config, run_dir: Path | None = None, universal: bool = False, weights: dict | None = None):
        from torch import distributed as dist

        self.cfg = cfg
        self.sp = cfg.train.sequence_parallel
        self.ds_config = resolve_ds_config(cfg, dist.get_world_size() // self.sp, run_dir, universal)
        check_granularity(cfg, self.ds_config, cfg.train.ds_config)
        mpu = sequence_parallel_state(self.sp) if self.sp > 1 else None
        if run_dir is not None and cfg.train.wandb != "disabled":
            os.environ["WANDB_MODE"] = cfg.train.wandb  # the config decides, whatever the shell exported
            os.environ.setdefault("WANDB_DIR", str(run_dir))
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if cfg.train.deterministic:  # before the first matmul creates cuBLAS's handle, which reads the variable
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, mpu=mpu, enabled=stage == 3):
            model = Transformer(cfg.model, cfg.topk)
        gather = (lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)) if stage == 3 else no_gather
        if stage == 3:  # the parameters are sharded now: make each block whole while it is initialised
            model.init_weights(gather=gather)
        if weights is not None:  # a warm start: before the optimizer copies the parameters
            load_weights(model, weights, gather)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        if mpu is not None:
            self.sp_group, self.sp_rank = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()
            model.set_attention(ulysses_attention(self.sp_group))
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.train.weight_decay),
                                               config=self.ds_config, mpu=mpu)
        if type(self.engine.checkpoint_engine) is TorchCheckpointEngine:  # not a fast or decoupled writer
            self.engine.checkpoint_engine = FileCheckpointEngine(self.engine._config)
        self.engine.lr_scheduler.step()  # from iteration -1 (lr 0) to 0: the first step's lr (resolve_ds_config)
        if cfg.train.compile:
            model.compile_blocks()
        self.model = model
        self.device = device()
        self.annealing = AnnealingHook(self.engine, cfg.train.steps, cfg.topk.anneal_ratio, cfg.topk.anneal)
        model.register_forward_pre_hook(self.annealing)

    @property
    def step(self) -> int:
        return self.engine.global_steps

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of the mean next-token loss of the micro-batch: all of it, or under sequence
        parallelism the loss of its slice of the positions (RoPE at their global positions) / N, so the shares
        of a group add up to the loss of the whole sequences, as do their gradients."""
        batch = batch.to(self.device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if self.sp == 1:
            return self.engine(inputs, targets)
        T = inputs.shape[1] // self.sp
        start = self.sp_rank * T
        return self.engine(inputs[:, start:start + T], targets[:, start:start + T], start=start) / self.sp

    def _reported(self, share: torch.Tensor) -> torch.Tensor:
        """This rank's loss with sequence parallelism undone: its mean over all ranks (the loop's
        mean_over_ranks) is the mean loss of the whole sequences, with no collective of its own."""
        return share.detach().float() * self.sp

    def micro_step(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward, backward and (at the accumulation boundary) the optimizer step of one micro-batch."""
        loss = self._loss(batch)
        self.engine.backward(loss)
        self.engine.step()
        return self._reported(loss)

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step will use (as the scheduler set it in the optimizer)."""
        return self.engine.optimizer.param_groups[0]["lr"]

    def step_report(self) -> dict:
        """After an optimizer step: whether it was applied, the gradient norm, steps skipped so far."""
        return {"applied": self.engine.was_step_applied(), "grad_norm": self.engine.get_global_grad_norm(),
                "skipped": self.engine.skipped_steps}

    @torch.no_grad()
    def eval_loss(self, batches) -> torch.Tensor:
        self.engine.eval()
        losses = [self._reported(self._loss(b)) for b in batches]
        self.engine.train()
        return torch.stack(losses).mean()

    def write_events(self, events: list[tuple[str, float, int]]) -> None:
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events(events)

    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        """Every rank; a failed write raises OSError on the ranks it failed on (see Checkpointer.save)."""
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)

    def load(self, path: Path) -> dict:
        """Load a checkpoint directory (a tag, or a universal checkpoint); returns the client state."""
        try:
            load_path, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        except ZeRORuntimeException:  # every rank alike: ZeRO's optimizer shards are split over the saving ranks
            saved = self.engine.loaded_checkpoint_dp_world_size
            here = self.engine.seq_dp_world_size
            raise SharedError(
                f"the checkpoint {path} was written by {saved} data-parallel ranks and this run has {here}; a ZeRO "
                f"checkpoint resumes on another number of ranks once converted: python -m "
                f"deepspeed.checkpoint.ds_to_universal --input_folder {path} --output_folder {path}_universal, then "
                f"--resume {path}_universal") from None
        except RuntimeError as e:  # torch's load_state_dict: a checkpoint of another model shape
            if "Error(s) in loading state_dict" not in str(e):
                raise
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "key" in line), "")
            raise UserError(f"the checkpoint {path} does not fit this model ({first}); resume it with the config "
                            "it was trained with") from None
        if load_path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint {path}")
        return client
