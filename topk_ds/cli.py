"""`topk-ds`: one command line for the whole pipeline.

Each area registers its own subcommands (`add_commands` in its `cli.py`); handlers import their
implementation lazily, so `--help` is instant and a corpus command never loads DeepSpeed.
"""

import argparse
import signal
import sys

from .arguments import Parser, config_args
from .errors import UserError, describe_os_error


def _config_show(a):
    import yaml

    from .config import load_config

    print(yaml.safe_dump(load_config(a.config, a.overrides).to_dict(), sort_keys=False), end="")


def _add_config_commands(commands) -> None:
    config = commands.add_parser("config", help="inspect configurations")
    sub = config.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    p = sub.add_parser("show", help="print the resolved, validated config as YAML")
    config_args(p)
    p.set_defaults(run=_config_show)


def build_parser() -> argparse.ArgumentParser:
    from .analysis.cli import add_commands as analysis_commands
    from .convert.cli import add_commands as convert_commands
    from .corpus.cli import add_commands as corpus_commands
    from .data.cli import add_commands as data_commands
    from .demo import add_commands as demo_commands
    from .evaluate.cli import add_commands as eval_commands
    from .plan import add_commands as plan_commands
    from .sae.cli import add_commands as sae_commands
    from .train.cli import add_commands as train_commands

    parser = Parser(prog="topk-ds", description="Train, convert, evaluate and analyse TopK language models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (demo_commands, corpus_commands, data_commands, _add_config_commands, train_commands, convert_commands,
                eval_commands, analysis_commands, sae_commands, plan_commands):
        add(commands)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that every atomic write removes its temporary as on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args.run(args)
    except UserError as e:
        print(f"topk-ds: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, a read-only or unwritable directory, a file size limit, a vanished file
        print(f"topk-ds: error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"topk-ds: {'terminated' if terminated else 'interrupted'}; nothing half-written was left", file=sys.stderr)
        sys.exit(143 if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
