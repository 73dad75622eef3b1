from pathlib import Path

from ..arguments import positive
from . import DEFAULT_DOCS


def _synth(a):
    from . import write_synthetic_corpus

    path = write_synthetic_corpus(Path(a.out), a.docs, a.seed)
    print(f"wrote {a.docs} documents to {path} and the topic words to {Path(a.out) / 'concepts.json'}")


def add_commands(commands) -> None:
    corpus = commands.add_parser("corpus", help="the synthetic topic corpus (the embedded default)")
    sub = corpus.add_subparsers(dest="corpus_command", required=True, parser_class=type(corpus))
    p = sub.add_parser("synth", help="write the synthetic topic corpus as jsonl (text, topics) + concepts.json")
    p.add_argument("--out", required=True, help="new output directory (an existing one must be empty)")
    p.add_argument("--docs", type=positive, default=DEFAULT_DOCS, help=f"number of documents (default {DEFAULT_DOCS}, ~4.5 MB)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same bytes")
    p.set_defaults(run=_synth)
