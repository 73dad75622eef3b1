"""The training loop: the story of a run, one concern per call."""

import functools
import math
import time
from pathlib import Path

import torch

from ..config import Config, save_config
from ..data.dataset import GlobalSampler, TokenWindows
from ..errors import UserError
from ..io import write_json
from .checkpoint import (Checkpointer, TrainState, check_same_run, is_universal, recorded_state, saved_weights,
                         warm_start_tag)
from .distributed import Preemption, any_rank, data_parallel, mean_over_ranks, rank, together, world_size
from .engine import Engine, init_distributed, shutdown_distributed
from .monitor import Monitor, peak_flops, truncate_metrics
from .prefetch import Prefetcher
from .rundir import RunDirectory


def open_data(cfg: Config) -> tuple[TokenWindows, TokenWindows | None]:
    """Training and validation windows; the model's vocabulary comes from the data unless set."""
    if not cfg.data.path:
        raise UserError("data.path is not set: point it at prepared shards (topk-ds data prepare --out DIR)")
    train = TokenWindows(cfg.data.path, split="train", seq_len=cfg.data.seq_len)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = train.vocab_size
    else:
        train.check_vocab(cfg.model.vocab_size, "model.vocab_size")
    val = None
    if cfg.train.eval_every and train.manifest.get("splits", {}).get("val", {}).get("tokens", 0):
        val = TokenWindows(cfg.data.path, split="val", seq_len=cfg.data.seq_len)
    return train, val


def validation_batches(val: TokenWindows, cfg: Config, dp: tuple[int, int]) -> list[torch.Tensor]:
    """The same windows at every validation; each rank takes an equal, disjoint share (ZeRO-3 needs
    every rank to run the same number of forwards)."""
    micro, (dp_rank, world) = cfg.train.micro_batch, dp
    per_rank = min(cfg.train.eval_batches, len(val) // (micro * world))
    if per_rank == 0:
        raise UserError(f"the validation split has {len(val)} windows, fewer than {micro * world} "
                        f"(micro_batch x ranks); prepare more --val-tokens or set train.eval_every=0")
    return [val.batch(range((b * world + dp_rank) * micro, (b * world + dp_rank + 1) * micro)) for b in range(per_rank)]


def begin(cfg: Config, run_dir: Path, checkpointer: Checkpointer, resume: str, global_batch: int) -> tuple:
    """Every check that may refuse the start, then the engine (with the checkpoint or the warm start's weights
    loaded). Nothing of the run is written here, so a refused start leaves the run as it was."""
    start = checkpointer.resolve(resume)
    warm = None
    if start is not None:
        with together():
            check_same_run(cfg, start)
            if (recorded := recorded_state(start)) is not None:
                recorded.check_batch(global_batch)
    elif cfg.train.init_from:
        with together():
            warm = warm_start_tag(cfg.train.init_from)
    engine = Engine(cfg, run_dir, universal=start is not None and is_universal(start),
                    weights=saved_weights(warm) if warm else None)
    state = TrainState(global_batch=global_batch)
    if start is not None:
        state = TrainState.saved(engine.load(start)["train_state"])
        state.check_batch(global_batch)  # a universal checkpoint holds its state only inside
    return engine, state, start, warm


def train(cfg: Config, resume: str = "none") -> Path:
    dp = data_parallel(cfg.train.sequence_parallel)  # a bad degree is refused before any process group exists
    init_distributed()
    try:
        return _train(cfg, resume, dp)
    finally:
        shutdown_distributed()


def _train(cfg: Config, resume: str, dp: tuple[int, int]) -> Path:
    (dp_rank, dp_world), run_dir = dp, Path(cfg.train.out_dir)
    with together():
        data, val = open_data(cfg)
        val_batches = validation_batches(val, cfg, dp) if val is not None else None
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * dp_world
    say = print if rank() == 0 else lambda message: None
    # held for the whole run: the directory's lock, and signals (one during start-up is honoured after the first step)
    with Preemption() as preemption, RunDirectory(run_dir, log=say) as claimed:
        checkpointer = Checkpointer(run_dir / "checkpoints", cfg.train.save_every, cfg.train.keep_last, log=say)
        engine, state, start, warm = begin(cfg, run_dir, checkpointer, resume, global_batch)
        with together():
            if rank() == 0:  # the one writer of the run's own files
                truncate_metrics(run_dir / "metrics.jsonl", state.step)
                (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
                save_config(cfg, run_dir / "config.yaml")
                write_json(run_dir / "ds_config.json", engine.ds_config)
        claimed.commit()

        sampler = GlobalSampler(len(data), global_batch, cfg.data.seed)
        sampler.load_state_dict(state.sampler)

        monitor = Monitor(run_dir, engine.model, engine.write_events, total_steps=cfg.train.steps, start_step=state.step,
                          global_batch=global_batch, seq_len=cfg.data.seq_len,
                          flops_per_token=cfg.model.flops_per_token(cfg.data.seq_len),
                          peak=peak_flops(engine.device, cfg.train.precision), world=world_size(),
                          health_window=cfg.train.health_window, log_every=cfg.train.log_every,
                          is_rank0=rank() == 0)
        checkpointer.log = monitor.log
        sp = cfg.train.sequence_parallel
        ranks = f"{world_size()} ranks" + (f" ({dp_world} data-parallel x {sp} sequence-parallel)" if sp > 1 else "")
        how = f"resumed from {start}" if start else f"started from the weights of {warm}" if warm else "started"
        monitor.log(f"{how} at step {state.step} of {cfg.train.steps}: {cfg.model.num_params():,} parameters, {ranks}, "
                    f"global batch {global_batch} x {cfg.data.seq_len} tokens")
        bad_in_a_row = 0
        next_indices = functools.partial(sampler.next_step, dp_rank, dp_world, cfg.train.micro_batch)
        with Prefetcher(data.batch, next_indices, sampler.state_dict, pin_memory=engine.device.type == "cuda") as prefetch:
            while state.step < cfg.train.steps:
                started, lr = time.perf_counter(), engine.lr
                batches, sampler_state = prefetch.next_step()
                losses = [engine.micro_step(batch) for batch in batches]
                loss = mean_over_ranks(torch.stack(losses).mean()).item()
                report = engine.step_report()
                step_time = time.perf_counter() - started
                state.step, state.tokens = engine.step, state.tokens + global_batch * cfg.data.seq_len
                state.sampler, state.skipped_steps = sampler_state, report["skipped"]

                good = report["applied"] and math.isfinite(loss)
                bad_in_a_row = 0 if good else bad_in_a_row + 1
                if not good:
                    monitor.log(f"step {state.step}: non-finite loss or gradient, update skipped ({bad_in_a_row} in a row)")
                extra = {}
                if val_batches and state.step % cfg.train.eval_every == 0:
                    val_loss = mean_over_ranks(engine.eval_loss(val_batches)).item()
                    extra = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
                    monitor.log(f"step {state.step}: validation loss {val_loss:.4f}, perplexity {extra['val_ppl']:.2f}")
                monitor.step(state.step, loss, step_time=step_time, lr=lr, alpha=engine.annealing.alpha_of(state.step - 1),
                             grad_norm=report["grad_norm"], applied=good, skipped_total=state.skipped_steps,
                             tokens=state.tokens, extra=extra)
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    last = checkpointer.last_saved or "none (no checkpoint was saved yet)"
                    monitor.close()
                    raise UserError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (up to step "
                                    f"{state.step}); stopping. Last good checkpoint: {last}")
                checkpointer.maybe_save(engine, state, final=state.step == cfg.train.steps)
                if any_rank(preemption.requested is not None, engine.device):
                    path = checkpointer.save(engine, state)
                    monitor.log(f"{preemption.requested or 'a signal on another rank'}: saved {path} at step {state.step}; "
                                f"resume with --resume auto")
                    break
        monitor.close()
    return run_dir
