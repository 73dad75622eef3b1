import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_one_error, cli_main

from topk_ds.data.dataset import GlobalSampler, TokenWindows, _epoch_seed, read_manifest, tokenizer_dir
from topk_ds.data.prepare import ShardWriter, goes_to_val, prepare, token_dtype
from topk_ds.data.tokenizer import import_tokenizer, load_sentencepiece, train_tokenizer
from topk_ds.errors import UserError
from topk_ds.io import sha256_file, write_json


def documents(corpus) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines()]


def stream(data, split: str) -> np.ndarray:
    m = read_manifest(data)
    dtype = np.dtype(m["dtype"]).newbyteorder("<")
    parts = [np.fromfile(data / s["file"], dtype=dtype) for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp*"))


# --- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_round_trip_sentencepiece_equals_hf(data_corpus, data_tokenizer):
    from transformers import AutoTokenizer

    sp = load_sentencepiece(data_tokenizer)
    hf = AutoTokenizer.from_pretrained(str(data_tokenizer))
    assert (sp.vocab_size(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (512, 0, 1, 2)
    assert (len(hf), hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (512, 1, 2, 0)
    texts = documents(data_corpus) + [" leading space", "  two\n\n\tthree 2024 é 東京 🎉", "a <s> b </s>", ""]
    for text in texts:
        ids = sp.encode(text, add_bos=True)
        assert hf(text)["input_ids"] == ids, text[:60]
        assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids) == text
    assert sp.encode("2024") == [sp.piece_to_id("▁")] + [sp.piece_to_id(d) for d in "2024"]  # digits split


def test_tokenizer_import_round_trips(data_tokenizer, tmp_path):
    out = import_tokenizer(data_tokenizer / "tokenizer.model", tmp_path / "imported")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    assert (out / "tokenizer.model").read_bytes() == (data_tokenizer / "tokenizer.model").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        import_tokenizer(data_tokenizer, out)


# --- prepare -----------------------------------------------------------------------------------

def write_formats(corpus, root):
    """The same documents as jsonl, as one .txt per document, and as parquet."""
    docs = documents(corpus)
    (root / "txt").mkdir(parents=True)
    for i, text in enumerate(docs):
        (root / "txt" / f"doc-{i:04d}.txt").write_text(text)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    pq.write_table(pa.table({"topics": [r["topics"] for r in rows], "text": docs}), root / "docs.parquet")
    return {"jsonl": corpus, "txt": root / "txt", "parquet": root / "docs.parquet"}


def test_prepare_from_jsonl_txt_parquet_gives_identical_streams(data_corpus, data_tokenizer, tmp_path):
    inputs = write_formats(data_corpus, tmp_path / "in")
    results = {}
    for fmt, path in inputs.items():
        out = tmp_path / fmt
        m = prepare([str(path)], data_tokenizer, out, val_tokens=1500, shard_tokens=3000, progress=False)
        results[fmt] = (stream(out, "train"), stream(out, "val"), m["documents"], m["tokens"])
    ref = results["jsonl"]
    for fmt in ("txt", "parquet"):
        assert np.array_equal(results[fmt][0], ref[0]) and np.array_equal(results[fmt][1], ref[1]), fmt
        assert results[fmt][2:] == ref[2:], fmt

    # The streams are exactly <s> ids </s> per document, split by the documented rule.
    sp = load_sentencepiece(data_tokenizer)
    train, val, have = [], [], 0
    for i, text in enumerate(documents(data_corpus)):
        ids = sp.encode(text, add_bos=True, add_eos=True)
        if have < 1500 and goes_to_val(0, i):
            val += ids
            have += len(ids)
        else:
            train += ids
    assert ref[0].tolist() == train and ref[1].tolist() == val
    assert 1500 <= len(val) < 1500 + max(len(sp.encode(t)) + 2 for t in documents(data_corpus))


def test_manifest_counts_equal_the_shards(prepared_data, data_tokenizer, data_corpus):
    m = read_manifest(prepared_data)
    assert m["format_version"] == 1 and m["dtype"] == "uint16" and m["source"] == str(data_corpus)
    assert m["tokenizer"] == {"dir": "tokenizer", "sha256": sha256_file(data_tokenizer / "tokenizer.model"),
                              "vocab_size": 512, "bos_id": 1, "eos_id": 2}
    assert m["documents"]["seen"] == m["documents"]["train"] + m["documents"]["val"] == 60
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert sum(s["tokens"] for s in shards) == m["splits"][split]["tokens"] == m["tokens"][split]
        assert all(s["tokens"] == 4000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 4000
        for s in shards:
            f = prepared_data / s["file"]
            assert f.stat().st_size == s["bytes"] == 2 * s["tokens"] and sha256_file(f) == s["sha256"]
    assert len(m["splits"]["train"]["shards"]) > 2
    assert m["tokens"]["total"] == m["tokens"]["train"] + m["tokens"]["val"]
    assert m["tokens"]["val"] >= 2000
    train = stream(prepared_data, "train")
    assert train.max() < 512 and (train == 1).sum() == (train == 2).sum() == m["documents"]["train"]
    assert sorted(p.name for p in tokenizer_dir(prepared_data).iterdir()) == [
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]


def test_max_tokens_cuts_the_stream_exactly(data_corpus, data_tokenizer, tmp_path):
    m = prepare([str(data_corpus)], data_tokenizer, tmp_path / "d", val_tokens=500, max_tokens=5000, progress=False)
    assert m["tokens"]["total"] == 5000 and m["documents"]["seen"] < 60
    assert len(stream(tmp_path / "d", "train")) + len(stream(tmp_path / "d", "val")) == 5000


def test_interrupted_prepare_leaves_nothing(data_corpus, data_tokenizer, tmp_path, monkeypatch):
    def interrupt(self, tokens):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(data_corpus)], data_tokenizer, tmp_path / "d", val_tokens=0, progress=False)
    assert_nothing_written(tmp_path / "d")


@pytest.mark.parametrize("fmt", ["jsonl", "txt", "parquet"])
def test_non_utf8_documents_are_skipped_and_counted(fmt, data_corpus, data_tokenizer, tmp_path):
    docs = documents(data_corpus)[:12]
    bad = b"caf\xe9 latin-1 bytes"
    src = tmp_path / "in"
    src.mkdir()
    if fmt == "jsonl":
        lines = [json.dumps({"text": t}).encode() for t in docs]
        lines.insert(5, b'{"text": "' + bad + b'"}')
        (src / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    elif fmt == "txt":
        for i, t in enumerate(docs):
            (src / f"{i:02d}.txt").write_text(t)
        (src / "05b.txt").write_bytes(bad)
    else:
        values = [t.encode() for t in docs]
        values.insert(5, bad)
        pq.write_table(pa.table({"text": pa.array(values, pa.binary()).view(pa.string())}), src / "a.parquet")
    m = prepare([str(src)], data_tokenizer, tmp_path / "d", val_tokens=0, progress=False)
    assert m["documents"]["not_utf8"] == 1 and m["documents"]["seen"] == 13 and m["documents"]["train"] == 12
    sp = load_sentencepiece(data_tokenizer)
    assert stream(tmp_path / "d", "train").tolist() == [i for t in docs for i in sp.encode(t, add_bos=True, add_eos=True)]
    with pytest.raises(UserError, match="not valid UTF-8"):
        prepare([str(src)], data_tokenizer, tmp_path / "strict", val_tokens=0, strict=True, progress=False)
    assert_nothing_written(tmp_path / "strict")


# --- dataset -----------------------------------------------------------------------------------

def test_windows_cover_the_stream_across_shards(prepared_data):
    w = TokenWindows(prepared_data, split="train", seq_len=64)
    tokens = stream(prepared_data, "train").astype(np.int64)
    assert len(w) == (len(tokens) - 1) // 64 and w.vocab_size == 512 and w.manifest["format_version"] == 1
    for i in [0, 1, 61, 62, 63, len(w) - 1]:  # window 62 crosses the first shard boundary (4000 tokens)
        assert w[i].dtype == torch.long and torch.equal(w[i], torch.from_numpy(tokens[i * 64:i * 64 + 65]))
    assert torch.equal(w.batch([3, 62, 3]), torch.stack([w[3], w[62], w[3]]))
    assert w[1][0] == w[0][-1]  # consecutive windows share the boundary token
    with pytest.raises(IndexError):
        w[len(w)]
    val = TokenWindows(prepared_data, split="val", seq_len=64)
    assert len(val) == (read_manifest(prepared_data)["tokens"]["val"] - 1) // 64


def test_uint32_shards_for_big_vocabularies(prepared_data, tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    data = shutil.copytree(prepared_data, tmp_path / "d")
    m = read_manifest(data)
    for split in ("train", "val"):
        tokens = stream(data, split).astype("<u4")
        tokens.tofile(data / f"wide-{split}.bin")
        m["splits"][split] = {"tokens": len(tokens), "shards": [{"file": f"wide-{split}.bin", "tokens": len(tokens),
                              "bytes": 4 * len(tokens), "sha256": sha256_file(data / f"wide-{split}.bin")}]}
    m["dtype"] = "uint32"
    write_json(data / "manifest.json", m)
    wide, narrow = TokenWindows(data, seq_len=64, verify=True), TokenWindows(prepared_data, seq_len=64)
    assert len(wide) == len(narrow) and torch.equal(wide.batch([0, 62, 99]), narrow.batch([0, 62, 99]))


def test_windows_pickle_without_copying_the_data(prepared_data):
    import pickle

    w = TokenWindows(prepared_data, seq_len=32)
    blob = pickle.dumps(w)
    assert len(blob) < 20_000 and torch.equal(pickle.loads(blob)[7], w[7])


def test_check_vocab(prepared_data):
    w = TokenWindows(prepared_data, seq_len=16)
    w.check_vocab(512, "model.vocab_size")
    with pytest.raises(UserError, match=r"vocab.*model\.vocab_size"):
        w.check_vocab(32000, "model.vocab_size")


def test_truncated_or_changed_shard_is_detected_at_load(prepared_data, tmp_path):
    data = shutil.copytree(prepared_data, tmp_path / "d")
    shard = data / read_manifest(data)["splits"]["train"]["shards"][1]["file"]
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-2])
    with pytest.raises(UserError, match="truncated"):
        TokenWindows(data, seq_len=16)
    shard.write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    TokenWindows(data, seq_len=16)  # same size: only the checksum can tell
    with pytest.raises(UserError, match="sha256"):
        TokenWindows(data, seq_len=16, verify=True)


def test_read_manifest_refuses_missing_corrupt_and_other_versions(prepared_data, tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        read_manifest(tmp_path)
    m = read_manifest(prepared_data)
    write_json(tmp_path / "manifest.json", {**m, "format_version": 99})
    with pytest.raises(UserError, match="format version 99"):
        read_manifest(tmp_path)
    write_json(tmp_path / "manifest.json", {**m, "splits": {"train": {}}})
    with pytest.raises(UserError, match="corrupt"):
        read_manifest(tmp_path)


def _shard(m):
    return m["splits"]["train"]["shards"][0]


def _shrink_first_shard(m, by=1000):
    """Every count of the manifest made consistent with a first shard `by` tokens shorter than its file."""
    _shard(m).update(tokens=_shard(m)["tokens"] - by, bytes=_shard(m)["bytes"] - 2 * by)
    m["splits"]["train"]["tokens"] -= by
    m["tokens"]["train"] -= by
    m["tokens"]["total"] -= by


# (edit of the manifest with every byte of the data unchanged, words of the line that catches it,
#  whether opening the data for training already refuses it)
MANIFEST_EDITS = {
    "shard tokens": (lambda m: _shard(m).update(tokens=_shard(m)["tokens"] - 10), ["train-00000.bin", "bytes"], True),
    "every count": (_shrink_first_shard, ["train-00000.bin", "truncated"], True),
    "dtype": (lambda m: m.update(dtype="uint32"), ["uint32", "bytes"], True),
    "dtype unknown": (lambda m: m.update(dtype="float64"), ["float64"], True),
    "vocab beyond dtype": (lambda m: m["tokenizer"].update(vocab_size=70000), ["70000", "uint16"], True),
    "vocab up": (lambda m: m["tokenizer"].update(vocab_size=600), ["vocab_size 600", "vocab_size 512"], False),
    "vocab down": (lambda m: m["tokenizer"].update(vocab_size=100), ["vocab_size 100", "vocab_size 512"], False),
    "bos id": (lambda m: m["tokenizer"].update(bos_id=7), ["bos_id 7", "bos_id 1"], False),
    "split total": (lambda m: m["splits"]["val"].update(tokens=5), ["val split's token counts"], True),
    "file outside": (lambda m: _shard(m).update(file="../manifest.json"), ["not a file name inside"], True),
}


@pytest.mark.parametrize("edit", MANIFEST_EDITS)
def test_verify_catches_a_manifest_edited_with_the_bytes_unchanged(edit, prepared_data, tmp_path, capsys):
    change, words, at_open = MANIFEST_EDITS[edit]
    data = shutil.copytree(prepared_data, tmp_path / "d")
    m = json.loads((data / "manifest.json").read_text())
    change(m)
    (data / "manifest.json").write_text(json.dumps(m))
    code, out, err = cli_main(capsys, "data", "verify", data)
    errors = [line for line in err.splitlines() if line.startswith("topk-ds: error: ")]
    assert code != 0 and "Traceback" not in err and errors, err
    assert any(all(w in line for w in words) for line in errors), errors
    if at_open:  # training and analysis open the data through TokenWindows: refused there too, in one line
        with pytest.raises(UserError, match="contradicts itself|truncated"):
            TokenWindows(data, seq_len=16)


def test_too_short_split_is_refused(prepared_data):
    with pytest.raises(UserError, match="fewer than one window"):
        TokenWindows(prepared_data, split="val", seq_len=100_000)


# --- sampler -----------------------------------------------------------------------------------

def run(sampler, steps, world, micro):
    """Each step's sample lists, per rank: what `world` ranks with their own samplers would see."""
    samplers = [sampler] + [GlobalSampler(sampler.num_samples, sampler.global_batch, sampler.seed) for _ in range(world - 1)]
    for s in samplers[1:]:
        s.load_state_dict(sampler.state_dict())
    out = []
    for _ in range(steps):
        out.append([s.next_step(r, world, micro) for r, s in enumerate(samplers)])
    assert len({str(s.state_dict()) for s in samplers}) == 1
    return out


def step_set(step) -> list[int]:
    return sorted(i for rank in step for micro in rank for i in micro)


def test_sampler_ranks_are_disjoint_and_cover_the_epoch():
    s = GlobalSampler(num_samples=100, global_batch=24, seed=1)
    steps = run(s, 4, world=4, micro=3)  # 4 steps x 24 = 96 of 100: the remainder of 4 is dropped
    for step in steps:
        assert all(len(rank) == 2 and all(len(m) == 3 for m in rank) for rank in step)  # accum = 24 / (4 x 3)
        per_rank = [set(i for m in rank for i in m) for rank in step]
        assert sum(map(len, per_rank)) == 24 and len(set().union(*per_rank)) == 24
    seen = [i for step in steps for i in step_set(step)]
    assert len(seen) == len(set(seen)) == 96 and s.state_dict() == {"epoch": 0, "index": 96}
    nxt = s.next_step(0, 1, 24)  # a new epoch, a new permutation
    assert s.state_dict() == {"epoch": 1, "index": 24} and nxt != [seen[:24]]


def test_sampler_is_deterministic_by_seed():
    a, b, c = (GlobalSampler(1000, 32, seed) for seed in (0, 0, 1))
    sa, sb, sc = ([s.next_step(1, 2, 4) for _ in range(5)] for s in (a, b, c))
    assert sa == sb and sa != sc
    assert GlobalSampler(1000, 32, 0).next_step(0, 1, 32)[0] == torch.randperm(
        1000, generator=torch.Generator().manual_seed(_epoch_seed(0, 0)), dtype=torch.int32)[:32].tolist()


def test_sampler_resumes_exactly_from_two_ranks_to_one():
    reference = run(GlobalSampler(200, 16, seed=3), 12, world=2, micro=4)  # crosses into epoch 1

    first = GlobalSampler(200, 16, seed=3)
    part1 = run(first, 5, world=2, micro=4)
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = GlobalSampler(200, 16, seed=3)
    resumed.load_state_dict(state)
    part2 = run(resumed, 7, world=1, micro=8)  # one rank, twice the micro-batch: the same global batch
    assert [step_set(s) for s in part1 + part2] == [step_set(s) for s in reference]
    seen = [i for s in part1 + part2 for i in step_set(s)][:192]  # epoch 0: 12 steps of 16 = 192 of 200
    assert len(set(seen)) == 192


def test_sampler_refuses_bad_layouts_and_states():
    with pytest.raises(UserError, match="fewer than one global batch"):
        GlobalSampler(10, 16, 0)
    s = GlobalSampler(100, 16, 0)
    with pytest.raises(UserError, match="multiple"):
        s.next_step(0, 3, 2)
    with pytest.raises(UserError, match="does not fit"):
        s.load_state_dict({"epoch": 0, "index": 101})


def test_sampler_caches_the_permutation_at_fineweb_scale():
    s = GlobalSampler(num_samples=20_000_000, global_batch=512, seed=0)  # ~20B tokens / 1025
    s.next_step(3, 8, 16)
    perm = s._perm
    for _ in range(200):
        s.next_step(3, 8, 16)
    assert s._perm is perm and s.state_dict() == {"epoch": 0, "index": 201 * 512}


# --- the command line: bad inputs end in one line, exit != 0, nothing half-written ------------------

def test_cli_tokenizer_train_and_prepare(data_corpus, tmp_path, capsys):
    code, out, err = cli_main(capsys, "tokenizer", "train", "--input", data_corpus, "--vocab-size", 400, "--out",
                              tmp_path / "tok")
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("wrote a 400-token sentencepiece BPE tokenizer")
    code, out, err = cli_main(capsys, "data", "prepare", "--input", data_corpus, "--tokenizer", tmp_path / "tok",
                              "--out", tmp_path / "d", "--val-tokens", 1000)
    assert code == 0, err
    assert out.strip().startswith("wrote ") and str(tmp_path / "d") in out
    assert read_manifest(tmp_path / "d")["tokenizer"]["vocab_size"] == 400


def test_cli_missing_and_empty_input(data_tokenizer, tmp_path, capsys):
    out = tmp_path / "d"
    assert_one_error(cli_main(capsys, "data", "prepare", "--input", tmp_path / "nope.jsonl", "--tokenizer",
                              data_tokenizer, "--out", out), "input not found", "nope.jsonl")
    assert_nothing_written(out)
    (tmp_path / "empty.jsonl").write_text("")
    assert_one_error(cli_main(capsys, "data", "prepare", "--input", tmp_path / "empty.jsonl", "--tokenizer",
                              data_tokenizer, "--out", out), "no documents", "empty.jsonl")
    assert_nothing_written(out)
    assert_one_error(cli_main(capsys, "tokenizer", "train", "--input", tmp_path / "nope.txt", "--vocab-size", 300,
                              "--out", tmp_path / "tok"), "not found")
    assert_nothing_written(tmp_path / "tok")


def test_cli_jsonl_without_text_field(data_tokenizer, tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"body": "hello there"}\n{"body": "again"}\n')
    out = tmp_path / "d"
    assert_one_error(cli_main(capsys, "data", "prepare", "--input", tmp_path / "a.jsonl", "--tokenizer",
                              data_tokenizer, "--out", out), "no field 'text'", "--text-field")
    assert_nothing_written(out)
    m = prepare([str(tmp_path / "a.jsonl")], data_tokenizer, out, text_field="body", val_tokens=0, progress=False)
    assert m["documents"]["train"] == 2 and m["text_field"] == "body"


def test_cli_non_utf8_fails_with_strict_else_skipped(data_corpus, data_tokenizer, tmp_path, capsys):
    good = data_corpus.read_bytes().splitlines()[:5]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(good[:2] + [b'{"text": "\xff\xfe"}'] + good[2:]) + b"\n")
    out = tmp_path / "d"
    assert_one_error(cli_main(capsys, "data", "prepare", "--input", tmp_path / "a.jsonl", "--tokenizer",
                              data_tokenizer, "--out", out, "--val-tokens", 0, "--strict"), "not valid UTF-8")
    assert_nothing_written(out)
    m = prepare([str(tmp_path / "a.jsonl")], data_tokenizer, out, val_tokens=0, progress=False)
    assert m["documents"] == {"seen": 6, "not_utf8": 1, "empty": 0, "train": 5, "val": 0}


def test_cli_val_tokens_larger_than_the_corpus(data_corpus, data_tokenizer, tmp_path, capsys):
    out = tmp_path / "d"
    assert_one_error(cli_main(capsys, "data", "prepare", "--input", data_corpus, "--tokenizer", data_tokenizer,
                              "--out", out, "--val-tokens", 10_000_000), "--val-tokens")
    assert_nothing_written(out)


def test_cli_refuses_a_finished_directory(prepared_data, data_corpus, data_tokenizer, capsys):
    before = sha256_file(prepared_data / "manifest.json")
    assert_one_error(cli_main(capsys, "data", "prepare", "--input", data_corpus, "--tokenizer", data_tokenizer,
                              "--out", prepared_data), "already holds prepared data")
    assert sha256_file(prepared_data / "manifest.json") == before


def test_cli_tokenizer_vocab_mismatch(prepared_data, data_corpus, tmp_path, capsys):
    data = shutil.copytree(prepared_data, tmp_path / "d")
    assert_one_error(cli_main(capsys, "data", "verify", data, "--config", "tiny", "--set", "model.vocab_size=1000"),
                     "vocab", "model.vocab_size=1000")
    train_tokenizer([str(data_corpus)], 400, tmp_path / "tok400", progress=False)
    shutil.copyfile(tmp_path / "tok400" / "tokenizer.model", tokenizer_dir(data) / "tokenizer.model")
    assert_one_error(cli_main(capsys, "data", "verify", data), "tokenizer.model", "vocab 400", "says vocab 512")


def test_cli_truncated_shard_and_checksum_mismatch(prepared_data, tmp_path, capsys):
    data = shutil.copytree(prepared_data, tmp_path / "d")
    code, out, err = cli_main(capsys, "data", "verify", data)
    assert code == 0 and out.startswith("verified") and "error" not in err, err
    shard = data / "train-00001.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-1])
    assert_one_error(cli_main(capsys, "data", "verify", data), "train-00001.bin", "truncated")
    shard.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert_one_error(cli_main(capsys, "data", "verify", data), "train-00001.bin", "sha256")


def test_cli_tokenizer_import_refuses_a_non_model(tmp_path, capsys):
    (tmp_path / "tokenizer.model").write_text("not a model")
    assert_one_error(cli_main(capsys, "tokenizer", "import", tmp_path / "tokenizer.model", "--out", tmp_path / "tok"),
                     "not a sentencepiece model")
    assert_nothing_written(tmp_path / "tok")


def test_cli_imports_stay_light():
    code = "import sys, topk_ds.data.cli; assert not {'torch', 'datasets', 'numpy'} & set(sys.modules), sys.modules.keys()"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
