"""`python -m topk_ds.analysis stats ...`: the statistics pass on G processes, under the launchers used for
training (each process runs every G-th batch, the statistics are merged, rank 0 writes them):

    deepspeed --num_gpus 8 --module topk_ds.analysis stats MODEL --data DATA --out OUT
    torchrun --nproc-per-node 8 -m topk_ds.analysis stats MODEL --data DATA --out OUT

Takes the arguments of `topk-ds analyze`; without a launcher it is one process, like `topk-ds analyze`.
"""

import os
import re
import signal
import sys

from ..arguments import Parser
from ..errors import UserError, describe_os_error
from .cli import add_commands

PARALLEL = ("stats",)  # the subcommands that split their work over processes


def _terminate(signum, frame):
    raise KeyboardInterrupt  # a launcher stopping its processes: atomic outputs remove their temporaries


def main(argv: list[str] | None = None) -> None:
    from ..devices import join_process_group, resolve
    from ..train.distributed import discover_ranks

    argv = sys.argv[1:] if argv is None else argv
    argv = [x for x in argv if not re.fullmatch(r"--local[_-]rank=\d+", x)]  # added by the deepspeed launcher
    parser = Parser(prog="python -m topk_ds.analysis")
    add_commands(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(["analyze", *argv])
    discover_ranks()
    world = int(os.environ["WORLD_SIZE"])
    prefix = f"rank {os.environ['RANK']}: " if world > 1 else ""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if world > 1:
            if args.analyze_command not in PARALLEL:
                raise UserError(f"analyze {args.analyze_command} runs in one process; only {', '.join(PARALLEL)} "
                                "splits its work over a launcher's processes")
            join_process_group(resolve(args.device, args.dtype)[0])
        args.run(args)
    except UserError as e:
        print(f"topk-ds: error: {prefix}{e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"topk-ds: error: {prefix}{describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"topk-ds: {prefix}interrupted; nothing half-written was left", file=sys.stderr)
        sys.exit(130)
    finally:
        import torch.distributed as dist

        signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
