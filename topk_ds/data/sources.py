"""Where documents come from, read through `datasets` in streaming mode.

An input is local when it names an existing file or directory, starts with / or ., contains a
glob character (* ? [) or ends in a known extension; anything else is a Hugging Face dataset
NAME[:CONFIG[:SPLIT]]. Local inputs may be several files, directories (searched recursively) or
globs of one format (empty files are ignored):

    .jsonl           one document per line, its text in --text-field (default `text`)
    .parquet         one document per row, its text in --text-field
    .txt             one document per FILE (the whole file; `datasets`' sample_by="document")

Documents come in a fixed order: files sorted by path, records in file order. A document whose
bytes are not valid UTF-8 comes as None, in its place (or, with strict, is an error).
"""

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

FORMATS = {".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
HELP = ("local .txt/.jsonl/.parquet files, directories or globs (one format; a .txt file is one "
        "document), or a Hugging Face dataset NAME[:CONFIG[:SPLIT]] streamed from the Hub (split "
        "default train), e.g. HuggingFaceFW/fineweb-edu:sample-10BT:train")


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@dataclass
class Source:
    spec: str  # the inputs as given, space-separated (recorded in the manifest)
    files: list[Path]  # local files in reading order; empty for a Hub dataset
    builder: str  # `datasets` builder: json | parquet | text, or the Hub dataset name
    config: str | None = None
    split: str = "train"


def _is_local(item: str) -> bool:
    return (Path(item).exists() or item.startswith(("/", ".")) or any(c in item for c in "*?[")
            or Path(item).suffix in FORMATS)


def _expand(item: str) -> list[Path]:
    path = Path(item)
    if any(c in item for c in "*?["):
        files = [Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file()]
        if not files:
            raise UserError(f"no files match {item}")
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix in FORMATS]
        if not files:
            raise UserError(f"directory {item} holds no {'/'.join(FORMATS)} files")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"input not found: {item}")
    unknown = [f for f in files if f.suffix not in FORMATS]
    if unknown:
        raise UserError(f"{unknown[0]}: unsupported file type; use {', '.join(FORMATS)}")
    return sorted(files)


def resolve(inputs: list[str]) -> Source:
    """Parse --input values into a Source (local files are expanded and checked here)."""
    spec = " ".join(inputs)
    if not inputs:
        raise UserError("no input given")
    if not all(_is_local(item) for item in inputs):
        if len(inputs) > 1:
            raise UserError(f"'{spec}': a Hugging Face dataset must be the only input (or a path does not exist)")
        parts = inputs[0].split(":")
        if len(parts) > 3 or not parts[0]:
            raise UserError(f"'{spec}' is no local path, nor a Hugging Face dataset NAME[:CONFIG[:SPLIT]]")
        name, config, split = (parts + [None, None])[:3]
        return Source(spec, [], name, config or None, split or "train")
    files = list(dict.fromkeys(f for item in inputs for f in _expand(item) if f.stat().st_size))
    if not files:
        raise UserError(f"no documents in {spec}: the input files are empty")
    builders = {FORMATS[f.suffix] for f in files}
    if len(builders) > 1:
        raise UserError(f"inputs mix formats ({', '.join(sorted({f.suffix for f in files}))}); prepare one format at a time")
    return Source(spec, files, builders.pop())


class DocumentReader:
    """Batches of document texts from a Source; None stands for a document that is not UTF-8."""

    def __init__(self, source: Source, text_field: str = "text", strict: bool = False):
        self.source, self.strict = source, strict
        self.field = "text" if source.builder == "text" else text_field  # the text loader names its column `text`
        self.dataset = self._load()

    def _load(self):
        import datasets
        import huggingface_hub

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to load ..." lines: ours says it once
        huggingface_hub.utils.logging.set_verbosity_error()  # no retry warnings: failures end in one UserError
        s = self.source
        try:
            if s.files:
                extra = {"sample_by": "document"} if s.builder == "text" else {}
                ds = datasets.load_dataset(s.builder, data_files=[str(f) for f in s.files], split="train",
                                           streaming=True, **extra)
            else:
                ds = datasets.load_dataset(s.builder, s.config, split=s.split, streaming=True)
        except Exception as e:  # `datasets` raises many types (offline, not found, bad file); all are the input's fault
            what = "" if s.files else " as a Hugging Face dataset (it is no local path either)"
            raise UserError(f"cannot load {s.spec}{what}: {first_line(e)}") from None
        if ds.features is None:  # unknown until read (a json whose first lines are not UTF-8): checked per batch
            return ds
        if self.field not in ds.features:
            raise UserError(f"{s.spec}: the documents have no field '{self.field}' (fields: "
                            f"{', '.join(ds.features)}); choose one with --text-field")
        dtype = getattr(ds.features[self.field], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise UserError(f"{s.spec}: field '{self.field}' holds {ds.features[self.field]}, not text; choose another --text-field")
        return ds.select_columns([self.field])

    def batches(self, size: int):
        """Lists of about `size` texts (the last may be shorter)."""
        batch = []
        for texts in self._texts(size):
            batch.extend(texts)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch

    def texts(self):
        """One text (or None) at a time."""
        for batch in self._texts(1024):
            yield from batch

    def _texts(self, size: int):
        import pyarrow as pa
        from datasets.table import CastError

        ds, files = self.dataset, self.source.files
        for i in range(ds.n_shards):  # a shard is a file: one undecodable file does not end the stream
            name = str(files[i]) if files else f"{self.source.spec} (shard {i})"
            done = 0
            try:
                for batch in ds.shard(ds.n_shards, i).iter(batch_size=size):
                    texts = batch.get(self.field)
                    if texts is None or None in texts:
                        raise UserError(f"{name}: a document has no '{self.field}' (missing or null); choose the text "
                                        f"field with --text-field")
                    done += len(texts)
                    yield texts
            except UnicodeDecodeError as e:
                if self.strict or not files:
                    raise UserError(f"{name} is not valid UTF-8 ({e.reason} at byte {e.start}); without --strict "
                                    f"such documents are skipped and counted") from None
                yield self._salvage(files[i], done)
            except CastError as e:
                raise UserError(f"{name}: its fields ({', '.join(e.table_column_names)}) differ from the first "
                                f"file's ({', '.join(e.requested_column_names)}); `datasets` reads files of one layout") from None
            except (OSError, ValueError, pa.ArrowException) as e:  # a malformed or unreadable file
                raise UserError(f"cannot read {name}: {first_line(e)}") from None

    def _salvage(self, file: Path, done: int) -> list[str | None]:
        """The documents of a file with bytes that are not UTF-8, after the `done` valid ones already
        yielded; None for each that is not UTF-8. A .txt file is one document."""
        if self.source.builder == "text":
            return [None]
        texts, valid = [], 0
        for i, raw in enumerate(_raw_documents(file, self.source.builder, self.field)):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                if valid >= done:
                    texts.append(None)
                continue
            if self.source.builder == "json":
                try:
                    text = json.loads(text).get(self.field)
                except (ValueError, AttributeError):
                    raise UserError(f"{file}: record {i + 1} is not a JSON object") from None
                if not isinstance(text, str):
                    raise UserError(f"{file}: record {i + 1} has no text field '{self.field}'")
            valid += 1
            if valid > done:
                texts.append(text)
        return texts


def _raw_documents(file: Path, builder: str, field: str):
    """Undecoded documents: the non-blank lines of a jsonl, or the `field` bytes of each parquet row."""
    if builder == "json":
        with open(file, "rb") as f:
            yield from (line for line in f if line.strip())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(file).iter_batches(columns=[field]):
            yield from batch.column(0).cast(pa.binary()).to_pylist()
