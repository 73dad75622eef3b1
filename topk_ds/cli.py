"""`topk-ds`: one command line for the whole pipeline. Handlers import their module lazily, so
`--help` is instant and a corpus command never loads DeepSpeed."""

import argparse
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="a preset (tiny, paper-1024x8, paper-2048x24, each also "
                   "NAME-dense) or a YAML file; a YAML may start from a preset with `preset: NAME`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.dim=2048 (repeatable; applied last)")


# ---------------------------------------------------------------- handlers


def _corpus_synth(a):
    from .corpus import write_synthetic_corpus

    path = write_synthetic_corpus(Path(a.out), a.docs, a.seed)
    print(f"wrote {a.docs} documents to {path} and the topic words to {Path(a.out) / 'concepts.json'}")


def _config_show(a):
    import yaml

    from .config import load_config

    print(yaml.safe_dump(load_config(a.config, a.overrides).to_dict(), sort_keys=False), end="")


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="topk-ds", description="Train, convert, evaluate and analyse TopK language models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    corpus = commands.add_parser("corpus", help="the synthetic topic corpus (the embedded default)")
    corpus_cmds = corpus.add_subparsers(dest="corpus_command", required=True, parser_class=_Parser)
    p = corpus_cmds.add_parser("synth", help="write the synthetic topic corpus as jsonl + concepts.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--docs", type=int, default=3600, help="number of documents (default 3600, ~4.5 MB)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same bytes")
    p.set_defaults(run=_corpus_synth)

    config = commands.add_parser("config", help="inspect configurations")
    config_cmds = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    p = config_cmds.add_parser("show", help="print the resolved, validated config as YAML")
    _config_args(p)
    p.set_defaults(run=_config_show)

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
