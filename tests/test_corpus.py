import collections
import json
import random

from topk_ds.corpus import load_concepts, write_synthetic_corpus
from topk_ds.corpus.grammar import TOPIC_LIST, choice_item, cloze_item, document, function_words


def test_same_seed_same_bytes(tmp_path):
    a = write_synthetic_corpus(tmp_path / "a", docs=40, seed=3, progress=False)
    b = write_synthetic_corpus(tmp_path / "b", docs=40, seed=3, progress=False)
    c = write_synthetic_corpus(tmp_path / "c", docs=40, seed=4, progress=False)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert (tmp_path / "a/concepts.json").read_bytes() == (tmp_path / "b/concepts.json").read_bytes()


def test_topics_are_rich_and_disjoint(tmp_path):
    assert len(TOPIC_LIST) >= 8
    counts = collections.Counter(w for t in TOPIC_LIST for w in t.words())
    assert not [w for w, c in counts.items() if c > 1]
    assert all(len(t.nouns) + len(t.verbs) + len(t.adjectives) >= 40 for t in TOPIC_LIST)
    assert not set(function_words()) & set(counts)
    write_synthetic_corpus(tmp_path, docs=2, progress=False)
    concepts = load_concepts(tmp_path)
    assert set(concepts) == {t.name for t in TOPIC_LIST} and "chef" in concepts["food"] and "chefs" in concepts["food"]


def test_documents_lean_on_their_topic():
    words = {t.name: t.words() for t in TOPIC_LIST}
    shares = []
    for i in range(30):
        doc = document(random.Random(i))
        tokens = [w.strip(".,?").lower() for w in doc["text"].split()]
        content = [w for w in tokens if any(w in ws for ws in words.values())]
        shares.append(sum(w in words[doc["topics"][0]] for w in content) / len(content))
        assert 100 <= len(tokens) <= 600
    assert 0.75 < sum(shares) / len(shares) < 0.95


def test_agreement_and_numbers():
    text = " ".join(document(random.Random(i))["text"] for i in range(20))
    assert "There is a" in text or "There is an" in text
    assert "There are" in text and " were " in text and "Why does" in text and "Why do" in text
    for sentence in text.replace("?", ".").split(". "):
        words = sentence.split()
        if words[:2] == ["There", "are"]:
            assert words[2] in {"two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                                "eleven", "twelve", "twenty", "fifty"}


def test_task_items():
    item = cloze_item(random.Random(1))
    assert item["context"].split().count(item["target"]) + item["context"].count(item["target"] + ".") >= 2
    mc = choice_item(random.Random(2))
    assert len(mc["choices"]) == 4 and 0 <= mc["label"] < 4
    on_topic = [t for t in TOPIC_LIST if t.name == mc["topic"]][0].words()
    right = mc["choices"][mc["label"]].rstrip(".?").lower().split()
    assert any(w in on_topic for w in right)
    json.dumps(mc)
