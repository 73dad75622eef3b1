import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Data pipeline fixtures (topk_ds.data): a small synthetic corpus, a tokenizer trained on it once per
# session, and a prepared data directory (shards of 4,000 tokens so windows cross shard boundaries).
DATA_DOCS, DATA_VOCAB = 60, 512


@pytest.fixture(scope="session")
def data_corpus(tmp_path_factory):
    from topk_ds.corpus import write_synthetic_corpus

    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), docs=DATA_DOCS, seed=0, progress=False)


@pytest.fixture(scope="session")
def data_tokenizer(data_corpus, tmp_path_factory):
    from topk_ds.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([str(data_corpus)], DATA_VOCAB, out, progress=False)
    return out


@pytest.fixture(scope="session")
def prepared_data(data_corpus, data_tokenizer, tmp_path_factory):
    from topk_ds.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare([str(data_corpus)], data_tokenizer, out, val_tokens=2000, shard_tokens=4000, progress=False)
    return out
