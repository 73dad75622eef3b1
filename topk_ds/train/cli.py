"""`topk-ds train` (one process) and `python -m topk_ds.train` (under a launcher) share these arguments."""

import argparse
import os
import sys


def add_train_args(p: argparse.ArgumentParser) -> None:
    from ..arguments import config_args

    config_args(p)
    p.add_argument("--resume", default="none", metavar="auto|none|PATH",
                   help="auto: continue from the newest complete checkpoint in train.out_dir/checkpoints (start "
                        "fresh if there is none); none (default): start fresh, refusing a run directory that has "
                        "checkpoints; PATH: a checkpoint tag directory, or a universal checkpoint made by "
                        "deepspeed.checkpoint.ds_to_universal (to resume on a different number of ranks)")


def run(args) -> None:
    import warnings

    from ..config import load_config
    from .distributed import discover_ranks
    from .loop import train

    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per call site and rank
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use `torch.distributed", category=FutureWarning)
    discover_ranks()
    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote checkpoints to {run_dir / 'checkpoints'} and metrics to {run_dir / 'metrics.jsonl'}")


def add_commands(commands) -> None:
    p = commands.add_parser("train", help="train a TopK (or dense) LM with DeepSpeed in this one process",
                            description="Train in one process (rank 0 of 1). For several GPUs or nodes use "
                            "`deepspeed --num_gpus 8 --module topk_ds.train --config ...` or launchers/*.")
    add_train_args(p)
    p.set_defaults(run=run)


def launcher_main(argv: list[str] | None = None) -> None:
    """Entry point under a launcher (deepspeed, mpirun, srun, torchrun)."""
    from ..arguments import Parser
    from ..errors import UserError, describe_os_error
    from .distributed import SharedError

    parser = Parser(prog="python -m topk_ds.train", description="Train under a multi-process launcher.")
    add_train_args(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    args = parser.parse_args(argv)
    try:
        run(args)
    except (UserError, OSError) as e:
        message = str(e) if isinstance(e, UserError) else describe_os_error(e)
        if not isinstance(e, SharedError) and os.environ.get("WORLD_SIZE", "1") != "1":
            message = f"rank {os.environ['RANK']}: {message}"
        if not isinstance(e, SharedError) or os.environ.get("RANK", "0") == "0":  # every rank has a SharedError
            print(f"topk-ds train: error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
