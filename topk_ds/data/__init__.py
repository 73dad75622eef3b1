"""The data pipeline: a sentencepiece tokenizer, packed token shards with a manifest, and the
fixed-window dataset and resumable global sampler the trainer reads them through.

    tokenizer.py  train / import a Llama-style sentencepiece BPE (+ the Hugging Face files)
    sources.py    documents from local txt/jsonl/parquet or a Hugging Face dataset (`datasets`)
    prepare.py    text -> token shards + manifest.json (`topk-ds data prepare`)
    manifest.py   reading and verifying a prepared directory (`topk-ds data verify`)
    dataset.py    TokenWindows and GlobalSampler (the trainer's contract)

Kept import-light on purpose: the CLI imports `topk_ds.data.cli` at start-up.
"""
