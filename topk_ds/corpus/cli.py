from pathlib import Path

from ..arguments import positive
from ..errors import UserError
from . import DEFAULT_DOCS


def _synth(a):
    if a.long:
        from .long import DEFAULT_FACTS, DEFAULT_LENGTH, DEFAULT_LONG_DOCS, write_long_corpus

        docs, length, facts = a.docs or DEFAULT_LONG_DOCS, a.length or DEFAULT_LENGTH, a.facts or DEFAULT_FACTS
        path = write_long_corpus(Path(a.out), docs, a.seed, length, facts)
        what = f"{docs} long documents ({length} words, {facts} planted facts each)"
    else:
        if a.length or a.facts:
            raise UserError("--length and --facts shape the documents of --long; add --long or leave them out")
        from . import write_synthetic_corpus

        docs = a.docs or DEFAULT_DOCS
        path = write_synthetic_corpus(Path(a.out), docs, a.seed)
        what = f"{docs} documents"
    print(f"wrote {what} to {path} and the topic words to {Path(a.out) / 'concepts.json'}")


def add_commands(commands) -> None:
    from .long import DEFAULT_FACTS, DEFAULT_LENGTH, DEFAULT_LONG_DOCS, MIN_DISTANCE

    corpus = commands.add_parser("corpus", help="the synthetic topic corpus (the embedded default)")
    sub = corpus.add_subparsers(dest="corpus_command", required=True, parser_class=type(corpus))
    p = sub.add_parser("synth", help="write the synthetic topic corpus as jsonl (text, topics) + concepts.json")
    p.add_argument("--out", required=True, help="new output directory (an existing one must be empty)")
    p.add_argument("--docs", type=positive, help=f"number of documents (default {DEFAULT_DOCS}, ~4.5 MB; with --long "
                   f"{DEFAULT_LONG_DOCS})")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same bytes")
    p.add_argument("--long", action="store_true", help="long documents for retention: key -> value facts planted at "
                   "the start (\"The code of the spicy kettle is 7412.\") and stated again at distances spread "
                   f"log-uniformly from {MIN_DISTANCE} words to the document's length (`topk-ds eval --suite long` "
                   "measures their recall)")
    p.add_argument("--length", type=positive, help=f"with --long: words per document (default "
                   f"{DEFAULT_LENGTH}, about 8k tokens; a word is at least one token)")
    p.add_argument("--facts", type=positive, help=f"with --long: facts per document "
                   f"(default {DEFAULT_FACTS})")
    p.set_defaults(run=_synth)
