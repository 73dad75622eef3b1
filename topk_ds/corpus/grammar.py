"""A seeded probabilistic grammar of English-like documents with planted topics.

Each document leans on one topic (80 % of its content words; the rest from a second topic or any
other) and on one "focus" noun it keeps coming back to. Sentences follow templates with
subject-verb agreement (the chef cooks / the chefs cook, there is / there are, was / were,
does / do) and number words (one bowl / three bowls). Because the concepts are planted, analysis
can be checked against ground truth (`concept_words`).
"""

import random
from dataclasses import dataclass

from .vocabulary import (CONNECTIVES, NUMBER_WORDS, PLURAL_PRONOUNS, PREPOSITIONS, SINGULAR_PRONOUNS,
                         TIME_WORDS, TOPICS)

MAIN_TOPIC_SHARE = 0.8  # share of a document's content words drawn from its main topic
FOCUS_SHARE = 0.25  # share of noun slots that reuse the document's focus noun


def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def third_person(verb: str) -> str:
    if verb.endswith(("s", "x", "z", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Topic:
    name: str
    nouns: tuple[tuple[str, str], ...]  # (singular, plural)
    verbs: tuple[tuple[str, str], ...]  # (base, third person singular)
    adjectives: tuple[str, ...]

    @classmethod
    def from_spec(cls, name: str, spec: dict) -> "Topic":
        nouns = tuple(tuple(w.split(":")) if ":" in w else (w, plural(w)) for w in spec["nouns"].split())
        verbs = tuple((v, third_person(v)) for v in spec["verbs"].split())
        return cls(name, nouns, verbs, tuple(spec["adjectives"].split()))

    def words(self) -> set[str]:
        """Every surface form of this topic's words."""
        return {w for pair in self.nouns + self.verbs for w in pair} | set(self.adjectives)


TOPIC_LIST = tuple(Topic.from_spec(name, spec) for name, spec in TOPICS.items())


def concept_words() -> dict[str, list[str]]:
    return {t.name: sorted(t.words()) for t in TOPIC_LIST}


def function_words() -> list[str]:
    words = {"the", "a", "an", "this", "some", "every", "one", "there", "is", "are", "was", "were", "why",
             "does", "do", "in", "and", "it"}
    words |= set(NUMBER_WORDS) | set(TIME_WORDS) | set(SINGULAR_PRONOUNS) | set(PLURAL_PRONOUNS)
    words |= set(PREPOSITIONS) | {w for c in CONNECTIVES for w in c.split()}
    return sorted(words)


class _Writer:
    """Draws the words of one document (or one choice of a task item)."""

    def __init__(self, rng: random.Random, main: Topic, second: Topic | None, main_share=MAIN_TOPIC_SHARE,
                 focus_share=FOCUS_SHARE):
        self.rng, self.main, self.second = rng, main, second
        self.main_share, self.focus_share = main_share, focus_share
        self.focus = rng.choice(main.nouns)

    def topic(self) -> Topic:
        if self.rng.random() < self.main_share:
            return self.main
        if self.second is not None:
            return self.second
        return self.rng.choice([t for t in TOPIC_LIST if t is not self.main])

    def noun(self) -> tuple[str, str]:
        if self.rng.random() < self.focus_share:
            return self.focus
        return self.rng.choice(self.topic().nouns)

    def verb(self) -> tuple[str, str]:
        return self.rng.choice(self.topic().verbs)

    def adj(self) -> str:
        return self.rng.choice(self.topic().adjectives)

    def number(self) -> str:
        return self.rng.choice(NUMBER_WORDS)

    def singular(self) -> str:
        """A singular noun phrase."""
        sg = self.noun()[0]
        roll = self.rng.random()
        if roll < 0.4:
            return f"the {self.adj()} {sg}"
        if roll < 0.55:
            return f"this {sg}"
        if roll < 0.7:
            return f"one {sg}"
        return f"the {sg}"

    def plural(self) -> str:
        pl = self.noun()[1]
        roll = self.rng.random()
        if roll < 0.3:
            return f"the {self.adj()} {pl}"
        if roll < 0.6:
            return f"{self.number()} {pl}"
        if roll < 0.75:
            return f"some {pl}"
        return f"the {pl}"

    def obj(self) -> str:
        return self.singular() if self.rng.random() < 0.5 else self.plural()

    def sentence(self, template: int | None = None) -> str:
        r = self.rng
        templates = (
            lambda: f"{self.singular()} {self.verb()[1]} {self.obj()}.",
            lambda: f"{self.plural()} {self.verb()[0]} {self.obj()}.",
            lambda: f"there is {(a := self.adj()) and article(a)} {a} {self.noun()[0]} {r.choice(PREPOSITIONS)} the {self.noun()[0]}.",
            lambda: f"there are {self.number()} {self.noun()[1]} {r.choice(PREPOSITIONS)} the {self.noun()[0]}.",
            lambda: f"{r.choice(SINGULAR_PRONOUNS)} {self.verb()[1]} {self.obj()} every {r.choice(TIME_WORDS)}.",
            lambda: f"{r.choice(PLURAL_PRONOUNS)} {self.verb()[0]} {self.obj()} every {r.choice(TIME_WORDS)}.",
            lambda: f"why does {self.singular()} {self.verb()[0]} {self.obj()}?",
            lambda: f"why do {self.plural()} {self.verb()[0]} {self.obj()}?",
            lambda: f"{self.singular()} was {self.adj()} and {self.plural()} were {self.adj()}.",
            lambda: f"in {r.randint(1200, 2020)}, {self.number()} {self.noun()[1]} were {self.adj()}.",
            lambda: f"{self.singular()} and {self.singular()} {self.verb()[0]} {self.obj()}.",
            lambda: f"{self.singular()} {self.verb()[1]} {self.obj()} {r.choice(CONNECTIVES)} {self.plural()} {self.verb()[0]} {self.obj()}.",
            lambda: f"{self.singular()} is {self.adj()}.",
            lambda: f"{self.plural()} are {self.adj()}.",
        )
        text = templates[r.randrange(len(templates)) if template is None else template]()
        return text[0].upper() + text[1:]

    def paragraphs(self, n_sentences: int) -> str:
        out, left = [], n_sentences
        while left > 0:
            size = min(left, self.rng.randint(4, 8))
            out.append(" ".join(self.sentence() for _ in range(size)))
            left -= size
        return "\n\n".join(out)


N_TEMPLATES = 14


def _topics(rng: random.Random) -> tuple[Topic, Topic | None]:
    main = rng.choice(TOPIC_LIST)
    second = rng.choice([t for t in TOPIC_LIST if t is not main]) if rng.random() < 0.5 else None
    return main, second


def document(rng: random.Random) -> dict:
    """One training document: {"text": ..., "topics": [main, second?]}."""
    main, second = _topics(rng)
    writer = _Writer(rng, main, second)
    text = writer.paragraphs(rng.randint(18, 36))
    return {"text": text, "topics": [main.name] + ([second.name] if second else [])}


def cloze_item(rng: random.Random) -> dict:
    """LAMBADA-style: a short document about its focus noun, ending "... He verbs the <adjective>", so
    the next word is a noun and the focus noun is the one to recall from the context."""
    while True:
        main, second = _topics(rng)
        writer = _Writer(rng, main, second, focus_share=0.35)
        context = " ".join(writer.sentence() for _ in range(rng.randint(6, 10)))
        target = writer.focus[0]
        if context.split().count(target) + context.split().count(target + ".") >= 2:
            break
    ending = f"{rng.choice(SINGULAR_PRONOUNS).capitalize()} {writer.verb()[1]} the {writer.adj()}"
    return {"context": f"{context} {ending}", "target": target, "topic": main.name}


def choice_item(rng: random.Random, n_choices: int = 4) -> dict:
    """Multiple choice: which next sentence stays on the topic of the context? Every choice uses the
    same template; only the topic of its words differs."""
    main, second = _topics(rng)
    context = " ".join(_Writer(rng, main, None).sentence() for _ in range(2))  # short: the task is not trivial
    others = rng.sample([t for t in TOPIC_LIST if t is not main], n_choices - 1)
    label = rng.randrange(n_choices)
    options = others[:label] + [main] + others[label:]
    template = rng.randrange(N_TEMPLATES)
    choices = []
    for topic in options:
        # identical draws for every choice, so only the topic's words differ
        state = random.Random(rng.random())
        choices.append(_Writer(state, topic, None, main_share=1.0, focus_share=0.0).sentence(template))
    return {"context": context, "choices": choices, "label": label, "topic": main.name}
