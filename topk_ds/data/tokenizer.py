"""Llama-style sentencepiece BPE tokenizers, saved as DIR/tokenizer.model plus the Hugging Face
files, so that `AutoTokenizer.from_pretrained(DIR)` loads offline and gives sentencepiece's ids.

The Hugging Face side is a plain `tokenizers` BPE with sentencepiece's own pre-processing written
as a normalizer (prepend "▁", spaces -> "▁") rather than LlamaTokenizer's Metaspace pre-tokenizer,
which drops a leading space; and special tokens are not parsed out of text (a literal "<s>" in a
document is text to sentencepiece too). Every save checks both give the same ids on CHECK_TEXT.
"""

import io
import os
from pathlib import Path

from ..errors import UserError
from ..io import atomic_output, check_new_dir
from .sources import DocumentReader, first_line, resolve

MODEL = "tokenizer.model"
FILES = (MODEL, "tokenizer.json", "tokenizer_config.json")  # what a tokenizer directory holds
DEFAULT_SAMPLE_SENTENCES = 2_000_000

# Llama's trainer settings: BPE, byte fallback, digits split one by one, no normalisation or
# whitespace folding, <unk>=0 <s>=1 </s>=2 and no pad.
LLAMA_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=16384,
)
# Where tokenizer ports tend to disagree: leading and repeated spaces, newlines, tabs, digits, bytes.
CHECK_TEXT = " Two  spaces,\n\n\ttabs and digits 2024; café, 東京 🎉 <s> "


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_sentencepiece(path):
    """A SentencePieceProcessor from a tokenizer directory or a .model file."""
    import sentencepiece as spm

    path = Path(path)
    file = path / MODEL if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no tokenizer at {path} (expected {file}); make one with `topk-ds tokenizer train` or `import`")
    try:
        return spm.SentencePieceProcessor(model_file=str(file))
    except RuntimeError:
        raise UserError(f"{file} is not a sentencepiece model") from None


def _check_llama_style(model: bytes, origin) -> None:
    """Refuse models whose Hugging Face port would give other ids than sentencepiece."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    try:
        spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError:
        raise UserError(f"{origin} is not a sentencepiece model") from None
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    t, n = proto.trainer_spec, proto.normalizer_spec
    problems = [text for bad, text in [
        (t.model_type != t.BPE, f"model type {t.ModelType.Name(t.model_type)}, not BPE"),
        (not t.byte_fallback, "no byte fallback"),
        (n.name != "identity", f"normalization '{n.name}', not 'identity'"),
        (n.remove_extra_whitespaces, "remove_extra_whitespaces is on"),
        (not n.add_dummy_prefix, "add_dummy_prefix is off"),
        (t.bos_id < 0 or t.eos_id < 0, "no BOS/EOS ids"),
    ] if bad]
    if problems:
        raise UserError(f"{origin} is not a Llama-style tokenizer ({'; '.join(problems)}), so sentencepiece and "
                        f"Hugging Face would disagree on ids")


def _write_hf_files(folder: Path) -> None:
    from tokenizers import normalizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    sp = load_sentencepiece(folder)
    special = dict(bos_token=sp.id_to_piece(sp.bos_id()), eos_token=sp.id_to_piece(sp.eos_id()),
                   unk_token=sp.id_to_piece(sp.unk_id()))
    backend = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False,
                                             **special).backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True, **special)
    hf.save_pretrained(str(folder))


def _check_agreement(folder: Path, origin) -> None:
    from transformers import AutoTokenizer

    sp = load_sentencepiece(folder)
    hf = AutoTokenizer.from_pretrained(str(folder))
    if hf(CHECK_TEXT)["input_ids"] != sp.encode(CHECK_TEXT, add_bos=True):
        raise UserError(f"the Hugging Face tokenizer made from {origin} gives other ids than sentencepiece")


def save_tokenizer(model: bytes, out: Path, origin) -> Path:
    """Write OUT/tokenizer.model and the Hugging Face files in one rename, after checking they agree."""
    _check_llama_style(model, origin)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        tmp.mkdir()
        (tmp / MODEL).write_bytes(model)
        _write_hf_files(tmp)
        _check_agreement(tmp, origin)
    return out


def train_tokenizer(inputs: list[str], vocab_size: int, out, text_field: str = "text",
                    sample_sentences: int = DEFAULT_SAMPLE_SENTENCES, seed: int = 0, progress: bool = True) -> dict:
    """Train a Llama-style BPE on the lines of the input documents; sentencepiece keeps a random sample of
    at most `sample_sentences` lines, so memory stays bounded on a big corpus. Returns counts."""
    import sentencepiece as spm
    from ..progress import progress as progress_of

    out = Path(out)
    check_new_dir(out, "tokenizer train")
    if vocab_size < 1:
        raise UserError(f"--vocab-size must be >= 1, got {vocab_size}")
    reader = DocumentReader(resolve(inputs), text_field)
    counts = {"documents": 0, "not_utf8": 0}

    def lines():  # sentencepiece's sentences are lines: whole documents can exceed max_sentence_length
        try:
            for text in progress_of(reader.texts(), desc="reading", unit="doc", enabled=progress):
                counts["documents" if text is not None else "not_utf8"] += 1
                yield from (line for line in (text or "").split("\n") if line)
        except UserError as e:  # sentencepiece would turn it into a RuntimeError
            counts["error"] = e

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
                                       input_sentence_size=sample_sentences, shuffle_input_sentence=True,
                                       num_threads=cpu_threads(), minloglevel=2, **LLAMA_OPTIONS)
        failure = None
    except RuntimeError as e:
        failure = first_line(e).split("] ")[-1]  # without sentencepiece's source location
    if "error" in counts:
        raise counts["error"]
    if counts["documents"] == 0:
        raise UserError(f"no documents in {reader.source.spec}")
    if failure:
        raise UserError(f"sentencepiece cannot train a {vocab_size}-token tokenizer on {reader.source.spec}: {failure}")
    save_tokenizer(model.getvalue(), out, origin=reader.source.spec)
    return counts


def import_tokenizer(path, out) -> Path:
    """Copy an existing Llama tokenizer.model (a file, or a directory holding one) and add the Hugging Face files."""
    path, out = Path(path), Path(out)
    file = path / MODEL if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no tokenizer model at {file}")
    check_new_dir(out, "tokenizer import")
    return save_tokenizer(file.read_bytes(), out, origin=file)
