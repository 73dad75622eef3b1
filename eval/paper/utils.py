"""Data loader for fineweb_edu_valid.yaml: the held-out documents of the training corpus.

The documents come from lm-eval's task metadata `val_data` (`--metadata '{"val_data": PATH}'` on
the lm_eval command line; `topk-ds eval --val-data PATH` passes it itself): a prepared data
directory, whose validation shards are decoded back into documents, or a jsonl with a "text" field.
"""

import datasets


def load_valid(val_data: str | None = None, **metadata) -> datasets.DatasetDict:
    if not val_data:
        raise ValueError("fineweb_edu_valid needs its documents: pass --metadata '{\"val_data\": \"DATA_DIR or "
                         "docs.jsonl\"}' (a prepared data directory or a jsonl with a \"text\" field)")
    from topk_ds.evaluate.valid import validation_documents

    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": validation_documents(val_data)})})
