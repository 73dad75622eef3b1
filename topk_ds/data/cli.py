"""`topk-ds tokenizer train|import` and `topk-ds data prepare|verify`; handlers import their modules lazily."""

import argparse
import sys
from pathlib import Path

from ..arguments import config_args, count, positive
from .manifest import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_TOKENS
from .sources import HELP as INPUT_HELP
from .tokenizer import DEFAULT_SAMPLE_SENTENCES

PREPARE_HELP = """\
Tokenize documents into packed token shards for training, memory-mappable:

  OUT/train-NNNNN.bin, OUT/val-NNNNN.bin   raw little-endian uint16 ids (uint32 if vocab > 65536)
  OUT/manifest.json                        format version, tokenizer sha256 / vocab / BOS / EOS,
                                           dtype, per-shard tokens + bytes + sha256, totals,
                                           documents seen / not UTF-8 / empty, the source
  OUT/tokenizer/                           a copy of the tokenizer (the data is self-contained)

Each document becomes <s> ids </s>, encoded in batches by sentencepiece's multi-threaded encoder.
Validation: documents with text are numbered from 0 in input order; while validation holds fewer
than --val-tokens tokens, document i goes to it if blake2b("SEED:i") is even (about every second
document), after that all go to training. Everything is written into a hidden .OUT.tmp-HOST-PID
directory, manifest.json last, then renamed to OUT: an interrupted run (an error, Ctrl-C, SIGTERM)
leaves no OUT, and what a killed one (kill -9) left is removed by the next. Prepare does not
resume: an OUT that exists and is not empty is refused.

A SRC is local when it exists, starts with / or ., contains * ? [ or ends in .txt/.jsonl/.parquet;
otherwise it names a Hugging Face dataset (streamed: needs the network). Local files are read in
sorted path order (a directory: its .txt/.jsonl/.parquet files, recursively); one .txt file is one
document."""


def _tokenizer_train(a):
    from .tokenizer import train_tokenizer

    counts = train_tokenizer(a.input, a.vocab_size, a.out, a.text_field, a.sample_sentences, a.seed)
    skipped = f", {counts['not_utf8']} skipped: not UTF-8" if counts["not_utf8"] else ""
    print(f"wrote a {a.vocab_size}-token sentencepiece BPE tokenizer trained on {counts['documents']} documents"
          f"{skipped} to {a.out} (tokenizer.model + Hugging Face files)")


def _tokenizer_import(a):
    from .tokenizer import import_tokenizer, load_sentencepiece

    out = import_tokenizer(a.path, a.out)
    print(f"wrote the {load_sentencepiece(out).vocab_size()}-token tokenizer from {a.path} to {out} "
          f"(tokenizer.model + Hugging Face files)")


def _prepare(a):
    from .prepare import prepare

    m = prepare(a.input, a.tokenizer, a.out, a.text_field, a.val_tokens, a.max_tokens, a.seed, a.strict, a.shard_tokens)
    d, t = m["documents"], m["tokens"]
    shards = sum(len(split["shards"]) for split in m["splits"].values())
    print(f"wrote {t['total']:,} tokens ({t['train']:,} train, {t['val']:,} val) of {d['train'] + d['val']:,} "
          f"documents in {shards} shard files to {a.out} ({d['not_utf8']} skipped: not UTF-8, {d['empty']} empty)")


def _verify(a):
    from .manifest import read_manifest, verify

    m = read_manifest(a.dir)
    problems = verify(a.dir)
    if a.config or a.overrides:
        from ..config import load_config

        vocab = load_config(a.config, a.overrides).model.vocab_size
        if vocab is not None and vocab != m["tokenizer"]["vocab_size"]:
            problems.append(f"model.vocab_size={vocab} in the config does not match the data's tokenizer vocab "
                            f"{m['tokenizer']['vocab_size']}")
    for p in problems:
        print(f"topk-ds: error: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    n = sum(len(m["splits"][s]["shards"]) for s in m["splits"])
    print(f"verified {a.dir}: {n} shards ({m['tokens']['total']:,} tokens) and the tokenizer match manifest.json")


def add_commands(commands) -> None:
    tok = commands.add_parser("tokenizer", help="train or import a Llama-style sentencepiece tokenizer")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True, parser_class=type(tok))
    p = sub.add_parser("train", help="train a sentencepiece BPE (Llama style) and save it with the Hugging Face files",
                       description="Train a Llama-style sentencepiece BPE (byte fallback, digits split, identity "
                       "normalisation, <unk>=0 <s>=1 </s>=2) on the lines of the input documents and save "
                       "OUT/tokenizer.model plus the Hugging Face files: AutoTokenizer.from_pretrained(OUT) loads "
                       "offline and gives sentencepiece's ids (checked at save).")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC", help=INPUT_HELP)
    p.add_argument("--vocab-size", type=positive, required=True, metavar="N", help="number of tokens (Llama: 32000)")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory")
    p.add_argument("--text-field", default="text", metavar="NAME", help="the text field of jsonl/parquet records (default text)")
    p.add_argument("--sample-sentences", type=positive, default=DEFAULT_SAMPLE_SENTENCES, metavar="N",
                   help=f"train on a random sample of at most this many lines, so a big corpus stays bounded in "
                   f"memory (default {DEFAULT_SAMPLE_SENTENCES:,})")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.set_defaults(run=_tokenizer_train)

    p = sub.add_parser("import", help="import an existing Llama tokenizer.model and add the Hugging Face files",
                       description="Copy a Llama-style sentencepiece tokenizer.model (e.g. Llama's 32,000 tokens) "
                       "into OUT and write the Hugging Face files next to it, checking both give the same ids.")
    p.add_argument("path", help="a tokenizer.model, or a directory holding one")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory")
    p.set_defaults(run=_tokenizer_import)

    data = commands.add_parser("data", help="prepare token shards from text, and verify them")
    sub = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))
    p = sub.add_parser("prepare", help="tokenize documents into packed, memory-mappable token shards + manifest",
                       description=PREPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="SRC", help=INPUT_HELP)
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer directory (`topk-ds tokenizer train/import`)")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory")
    p.add_argument("--text-field", default="text", metavar="NAME", help="the text field of jsonl/parquet/Hub records (default text)")
    p.add_argument("--val-tokens", type=count, default=DEFAULT_VAL_TOKENS, metavar="N",
                   help=f"hold out at least this many tokens for validation, 0 for none (default {DEFAULT_VAL_TOKENS:,}; "
                   f"about 10M for FineWeb-Edu); an error if the corpus cannot give them")
    p.add_argument("--max-tokens", type=positive, default=None, metavar="N",
                   help="stop after this many tokens in total (the last document is cut); default: the whole input")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split (default 0)")
    p.add_argument("--strict", action="store_true",
                   help="fail on a document that is not valid UTF-8 (default: skip it and count it in the manifest)")
    p.add_argument("--shard-tokens", type=positive, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    p.set_defaults(run=_prepare)

    p = sub.add_parser("verify", help="check every shard's size, sha256 and ids (and the tokenizer) against the manifest",
                       description="Check DIR/manifest.json against itself (token counts against byte counts, the "
                       "dtype against the vocabulary, split totals) and against the files: every shard's size, "
                       "sha256 and largest token id, the tokenizer's sha256, vocabulary size and BOS/EOS ids; with "
                       "--config/--set, also the config's model.vocab_size. Prints one line per problem and exits 1 on any.")
    p.add_argument("dir", type=Path, help="a prepared data directory")
    config_args(p)
    p.set_defaults(run=_verify)
