"""`topk-ds data prepare` throughput against its limit, in the same run: tokens/s of the whole
prepare (jsonl read through `datasets`, encode, split, write shards + sha256 + manifest) vs the raw
sentencepiece batched encode of the same documents already in memory, all cores. Target >= 0.7.

    python bench/bench_prepare.py [--quick]
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Figure, main, timeit_pair  # noqa: E402
from topk_ds.corpus import write_synthetic_corpus  # noqa: E402
from topk_ds.data.prepare import prepare  # noqa: E402
from topk_ds.data.tokenizer import cpu_threads, load_sentencepiece, train_tokenizer  # noqa: E402

VOCAB = 2048


def run(quick: bool) -> list[Figure]:
    docs, repeats = (4000, 2) if quick else (16000, 5)  # ~5 MB / ~20 MB of text
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = write_synthetic_corpus(tmp / "corpus", docs=docs, progress=False)
        tokenizer = tmp / "tokenizer"
        train_tokenizer([str(corpus)], VOCAB, tokenizer, sample_sentences=200_000, progress=False)
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        sp, threads = load_sentencepiece(tokenizer), cpu_threads()
        tokens = sum(map(len, sp.encode(texts, add_bos=True, add_eos=True, num_threads=threads)))
        out = tmp / "data"

        def ours():
            shutil.rmtree(out, ignore_errors=True)
            m = prepare([str(corpus)], tokenizer, out, val_tokens=100_000, progress=False)
            assert m["tokens"]["total"] == tokens

        def peer():
            sp.encode(texts, add_bos=True, add_eos=True, num_threads=threads)

        t_ours, t_peer = timeit_pair(ours, peer, repeats=repeats, warmup=1)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    return [Figure(f"data prepare, {mb:.1f} MB synthetic jsonl, vocab {VOCAB}, {threads} threads", tokens / t_ours,
                   "tokens/s", "sentencepiece batched encode in memory", tokens / t_peer, t_peer / t_ours,
                   "rate vs peer (higher is better)", ">= 0.7")]


if __name__ == "__main__":
    main("prepare", run)
