"""`topk-ds`: one command line for the whole pipeline.

Each area registers its own subcommands (`add_commands` in its `cli.py`); handlers import their
implementation lazily, so `--help` is instant and a corpus command never loads DeepSpeed.
"""

import argparse
import sys

from .errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def count(text: str) -> int:
    """A whole-number argument that may be written 20e9 or 1_000_000; >= 0."""
    text = text.replace("_", "")
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number (e.g. 1000000 or 20e9), got '{text}'") from None
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'")
        value = int(value)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive(text: str) -> int:
    """A whole-number argument >= 1 (20e9 style accepted)."""
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def config_args(p: argparse.ArgumentParser) -> None:
    """--config and --set, shared by every command that takes a run config."""
    p.add_argument("--config", default=None, help="a preset (tiny, paper-1024x8, paper-2048x24, each also "
                   "NAME-dense) or a YAML file; a YAML may start from a preset with `preset: NAME`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.dim=2048 (repeatable; applied last)")


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
    from .train.cli import add_commands as train_commands

    parser = Parser(prog="topk-ds", description="Train, convert, evaluate and analyse TopK language models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (demo_commands, corpus_commands, data_commands, _add_config_commands, train_commands, convert_commands,
                eval_commands, analysis_commands, plan_commands):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"topk-ds: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("topk-ds: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
